// apply_masks_: schema, input checks and CUDA registration (kernel: apply_masks.cu).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "apply_masks.h"
#include "tensor_checks.h"

namespace swamp {
namespace {

// In place: tensors[i] = 0 where masks[i] is false; masks[i] has the shape of tensors[i]
// or of tensors[i][0]. All tensors contiguous on one CUDA device; one kernel launch.
void apply_masks_(at::TensorList tensors, at::TensorList masks) {
  constexpr const char* op = "apply_masks_";
  TORCH_CHECK_VALUE(tensors.size() == masks.size(), op, ": ", tensors.size(), " tensors but ", masks.size(),
                    " masks");
  if (tensors.empty()) {
    return;
  }
  check_distinct(op, {{"tensors", tensors}});
  const c10::Device device = tensors[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": tensors[0] is on ", device, ", expected a CUDA device");
  std::vector<MaskEntry> entries;
  entries.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::Tensor& m = masks[i];
    check_dense_on(op, "tensors", i, t, device);
    check_float(op, "tensors", i, t);
    check_dense_on(op, "masks", i, m, device);
    check_mask(op, i, m, "tensors", t);
    if (t.numel() > 0) {
      entries.push_back({t.data_ptr(), static_cast<const uint8_t*>(m.const_data_ptr()), t.numel(),
                         m.numel(), static_cast<int64_t>(t.element_size())});
    }
  }
  const c10::cuda::CUDAGuard guard(device);
  C10_CUDA_CHECK(launch_apply_masks(entries, device.index(), c10::cuda::getCurrentCUDAStream().stream()));
}

}  // namespace
}  // namespace swamp

TORCH_LIBRARY_FRAGMENT(swamp_kernels, m) {
  m.def("apply_masks_(Tensor(a!)[] tensors, Tensor[] masks) -> ()");
}

TORCH_LIBRARY_IMPL(swamp_kernels, CUDA, m) {
  m.impl("apply_masks_", &swamp::apply_masks_);
}
