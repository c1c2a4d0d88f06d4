#include "train/result_json.h"

namespace lowbit::train {

nlohmann::json to_json(const TrainConfig& c, const TrainResult& r) {
  nlohmann::json history = nlohmann::json::array();
  for (const EpochRecord& e : r.history)
    history.push_back({{"epoch", e.epoch}, {"train_loss", e.train_loss}, {"test_accuracy", e.test_accuracy},
                       {"seconds", e.seconds}, {"lr", e.lr}, {"steps", e.steps}});
  const ShampooOptions& s = c.shampoo;
  return {{"optimizer", c.optimizer},
          {"model", c.model},
          {"dataset", r.dataset},
          {"dataset_source", r.dataset_source},
          {"synthetic_data", r.synthetic},
          {"epochs", c.epochs},
          {"batch_size", c.batch_size},
          {"lr", s.lr()},
          {"schedule", c.schedule},
          {"warmup_epochs", c.warmup_epochs},
          {"seed", c.seed},
          {"test_accuracy", r.test_accuracy},
          {"final_train_loss", r.final_train_loss},
          {"optimizer_state_bytes", r.state.total()},
          {"preconditioner_state_bytes", r.state.preconditioner},
          {"first_order_state_bytes", r.state.first_order},
          {"step_ms_mean", r.step_ms_mean},
          {"batch_ms_mean", r.batch_ms_mean},
          {"wall_s", r.wall_s},
          {"steps", r.steps},
          {"root_updates", r.root_updates},
          {"arith", arith::to_string(c.arithmetic.mode)},
          {"arith_fp32_epochs", c.arith_fp32_epochs},
          {"luq_clip", c.arithmetic.luq_clip},
          {"fqt_bits", c.arithmetic.fqt_bits},
          {"fqt_scq", c.arithmetic.fqt_scq},
          {"activation_bytes_kept", r.activation_bytes_kept},
          {"activation_bytes_fp32", r.activation_bytes_fp32},
          {"resumed_from_epoch", r.resumed_from_epoch},
          {"nproc", r.world_size},
          {"ranks_agree", r.ranks_agree},
          {"communication", {{"exchanges", r.communication.exchanges},
                             {"state_bytes", r.communication.state_bytes},
                             {"gradient_bytes", r.communication.gradient_bytes}}},
          {"shampoo", {{"graft", s.graft()}, {"bits", s.bits()}, {"quantize", s.quantize()}, {"mapping", s.mapping()},
                       {"quant_block_size", s.quant_block_size()}, {"stat_interval", s.stat_interval()},
                       {"root_interval", s.root_interval()}, {"stat_decay", s.stat_decay()},
                       {"epsilon", s.epsilon()}, {"max_preconditioner_dim", s.max_preconditioner_dim()},
                       {"min_quant_numel", s.min_quant_numel()}, {"eigen_update", s.eigen_update()},
                       {"double_quant_scales", s.double_quant_scales()}}},
          {"history", history},
          {"step_losses", r.step_losses}};
}

}  // namespace lowbit::train
