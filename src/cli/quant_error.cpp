// `lowbit quant-error`: the paper's Table 1 error analysis on synthetic SPD matrices.
#include <nlohmann/json.hpp>

#include <c10/util/Exception.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <lowbit/quant_options.h>

#include "analysis/quant_error.h"
#include <torch/serialize.h>

#include <filesystem>

#include "cli/commands.h"
#include "cli/json_output.h"

namespace lowbit::cli {
namespace {

struct QuantErrorArgs {
  analysis::QuantErrorOptions options;
  std::string json_path;
  std::string matrix_path;  // a saved SPD matrix (train --dump-preconditioner) instead of synthetic ones
};

// The matrix of --matrix: a square, symmetric, finite tensor saved with torch::save.
at::Tensor load_matrix(const std::string& path) {
  at::Tensor m;
  try {
    torch::load(m, path);
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, "--matrix: cannot read a tensor from ", path, ": ", e.what_without_backtrace());
  }
  TORCH_CHECK(m.dim() == 2 && m.size(0) == m.size(1) && m.size(0) > 0, "--matrix: ", path,
              " must hold a square matrix; got shape ", m.sizes());
  m = m.to(at::kDouble);
  TORCH_CHECK(m.isfinite().all().item<bool>(), "--matrix: ", path, " contains NaN or Inf");
  TORCH_CHECK((m - m.t()).abs().max().item<double>() <= 1e-4 * m.abs().max().item<double>(), "--matrix: ", path,
              " is not symmetric");
  return (m + m.t()) / 2;
}

// CLI::PositiveNumber's message spells out DBL_MAX; this one names the value only.
const CLI::Validator kPositive(
    [](std::string& text) {
      double value = 0;
      return CLI::detail::lexical_cast(text, value) && value > 0 ? std::string()
                                                                  : "must be a positive number; got " + text;
    },
    "POSITIVE");

void run(const QuantErrorArgs& args) {
  const analysis::QuantErrorOptions& o = args.options;
  check_block_size(o.block_size, "--block-size");  // before the header, not after seconds of work
  if (args.matrix_path.empty()) {
    std::printf("lowbit quant-error: f(A) = (A + %g lambda_max I)^(-1/4), order %lld, block %lld, seed %llu\n",
                o.epsilon, static_cast<long long>(o.order), static_cast<long long>(o.block_size),
                static_cast<unsigned long long>(o.seed));
  } else {
    std::printf("lowbit quant-error: f(A) = (A + %g lambda_max I)^(-1/4), A from %s, block %lld\n", o.epsilon,
                args.matrix_path.c_str(), static_cast<long long>(o.block_size));
  }
  std::printf("NRE = ||f - g||_F / ||f||_F ; AE = angle between f and g (degrees)\n\n");
  std::printf("%-14s %-8s %4s %-17s %9s %7s %3s %8s %8s\n", "matrix", "mapping", "bits", "quantized", "rectified",
              "updates", "EF", "NRE", "AE deg");
  nlohmann::json rows = nlohmann::json::array();
  const std::vector<analysis::QuantErrorRow> table =
      args.matrix_path.empty() ? analysis::quant_error_table(o)
                               : analysis::quant_error_rows(std::filesystem::path(args.matrix_path).filename().string(),
                                                            load_matrix(args.matrix_path),
                                                            o.block_size, o.epsilon);
  for (const analysis::QuantErrorRow& r : table) {
    const bool cholesky = r.quantized == "cholesky";
    std::printf("%-14s %-8s %4d %-17s %9s %7d %3s %8.4f %8.3f\n", r.matrix.c_str(), r.mapping.c_str(), r.bits,
                r.quantized.c_str(), cholesky ? "-" : r.rectified ? "yes" : "no", r.updates,
                cholesky ? (r.error_feedback ? "yes" : "no") : "-", r.nre, r.angle_deg);
    rows.push_back({{"matrix", r.matrix},
                    {"mapping", r.mapping},
                    {"bits", r.bits},
                    {"quantized", r.quantized},
                    {"rectified", r.rectified},
                    {"updates", r.updates},
                    {"error_feedback", r.error_feedback},
                    {"nre", r.nre},
                    {"angle_deg", r.angle_deg}});
  }
  if (!args.json_path.empty()) {
    write_json(args.json_path, nlohmann::json{{"command", "quant-error"},
                                              {"order", o.order},
                                              {"block_size", o.block_size},
                                              {"epsilon", o.epsilon},
                                              {"seed", o.seed},
                                              {"rows", rows}});
    std::printf("\nwrote %s\n", args.json_path.c_str());
  }
}

}  // namespace

void add_quant_error(CLI::App& app) {
  auto args = std::make_shared<QuantErrorArgs>();
  analysis::QuantErrorOptions& o = args->options;
  CLI::App* cmd = app.add_subcommand(
      "quant-error", "Error of low-bit inverse 4th roots on synthetic SPD matrices (paper Table 1)");
  cmd->add_option("--order", o.order, "Matrix order")->check(kPositive)->capture_default_str();
  cmd->add_option("--block-size", o.block_size, "Elements per block scale (power of two, 16..4096)")
      ->capture_default_str();
  cmd->add_option("--epsilon", o.epsilon, "Ridge relative to lambda_max")
      ->check(kPositive)->capture_default_str();
  cmd->add_option("--seed", o.seed, "Seed of the random eigenbasis")->capture_default_str();
  cmd->add_option("--matrices", o.matrices, "Synthetic matrices")
      ->check(CLI::IsMember(analysis::synthetic_matrix_names()))->capture_default_str();
  cmd->add_option("--json", args->json_path, "Also write the rows to this JSON file");
  cmd->add_option("--matrix", args->matrix_path,
                  "Analyse this saved SPD matrix (e.g. from `lowbit train --dump-preconditioner`) instead");
  cmd->callback([args] { run(*args); });
}

}  // namespace lowbit::cli
