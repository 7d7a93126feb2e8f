// PLACEHOLDER: filled by the hidden_mse kernel work.
#include "ops.h"

namespace kdfast {
void register_hidden_mse(pybind11::module_& m) { (void)m; }
}  // namespace kdfast
