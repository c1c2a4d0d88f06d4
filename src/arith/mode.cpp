// The names of the training arithmetics (lowbit/arith.h), for the CLI, JSON and summaries.
#include <c10/util/Exception.h>

#include <lowbit/arith.h>

#include <sstream>

namespace lowbit::arith {

Mode parse_mode(const std::string& name) {
  if (name == "fp32") return Mode::Fp32;
  if (name == "luq4") return Mode::Luq4;
  if (name == "fqt1") return Mode::Fqt1;
  if (name == "rmm") return Mode::Rmm;
  TORCH_CHECK(false, "arithmetic must be one of \"fp32\", \"luq4\", \"fqt1\", \"rmm\"; got \"", name, "\"");
}

std::string to_string(Mode mode) {
  switch (mode) {
    case Mode::Fp32: return "fp32";
    case Mode::Luq4: return "luq4";
    case Mode::Fqt1: return "fqt1";
    case Mode::Rmm: return "rmm";
  }
  return "unknown";
}

std::string describe(const ArithOptions& o) {
  std::ostringstream out;
  out << to_string(o.mode);
  if (o.mode == Mode::Fqt1)
    out << " (" << (o.fqt_bits > 1 ? "AGP keeps 1/" + std::to_string(o.fqt_bits) + " of the groups at " +
                                         std::to_string(o.fqt_bits) + " bits"
                                   : std::string("no pruning"))
        << ", " << (o.fqt_scq ? "SCQ" : "per-sample groups") << ")";
  if (o.mode == Mode::Luq4) out << (o.luq_clip ? " (MSE-clipped forward grid)" : " (absmax forward grid)");
  if (o.mode == Mode::Rmm) out << " (sketch keeps " << o.rmm_keep << " of the batch)";
  return out.str();
}

}  // namespace lowbit::arith
