// swa_update_: schema, input checks and CUDA registration (kernel: particles.cu). The Python
// side computes particle_average as swa_update_ at n_averaged == 0 into tensors it allocates
// in the particles' layout.
//
// A parameter of P particles is one contiguous [P, *shape] tensor; its average and its mask
// (optional: None leaves the parameter unmasked) have `shape`. One kernel launch per
// (particle dtype, average dtype) pair, in first-seen order.
#include <map>
#include <optional>
#include <utility>

#include <ATen/Functions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "particles.h"
#include "tensor_checks.h"

namespace swamp {
namespace {

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// In place: swa[i] += (mean_p(params[i]) - swa[i]) / (n_averaged + 1), 0 where masked; at
// n_averaged == 0, swa[i] = the masked mean (swa not read).
void swa_update_(at::TensorList swa, at::TensorList params, int64_t n_averaged, const OptionalTensors& masks) {
  constexpr const char* op = "swa_update_";
  TORCH_CHECK_VALUE(!params.empty(), op, ": params is empty");
  TORCH_CHECK_VALUE(swa.size() == params.size(), op, ": ", swa.size(), " swa but ", params.size(), " params");
  TORCH_CHECK_VALUE(masks.size() == params.size(), op, ": ", masks.size(), " masks but ", params.size(), " params");
  TORCH_CHECK_VALUE(n_averaged >= 0, op, ": n_averaged must be >= 0, got ", n_averaged);
  check_distinct(op, {{"swa", swa}});
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": params[0] is on ", device, ", expected a CUDA device");
  const int64_t particles = params[0].dim() > 0 ? params[0].size(0) : 0;
  std::map<std::pair<FloatType, FloatType>, std::vector<AverageEntry>> groups;
  std::vector<std::pair<FloatType, FloatType>> order;  // launch groups in first-seen order
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& out = swa[i];
    check_dense_on(op, "params", i, p, device);
    TORCH_CHECK_VALUE(p.dim() > 0 && p.size(0) == particles && particles > 0, op, ": params[", i, "] has shape ",
                      p.sizes(), "; expected [P, *shape] with P = ", particles, " like params[0]");
    check_dense_on(op, "swa", i, out, device);
    check_shape(op, "swa", i, out, p.sizes().slice(1), "params[:, ...]");
    const auto key = std::make_pair(float_type(op, "params", i, p), float_type(op, "swa", i, out));
    const std::optional<at::Tensor> mask = masks[i];
    const uint8_t* mask_data = nullptr;
    if (mask.has_value()) {
      check_dense_on(op, "masks", i, *mask, device);
      TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, op, ": masks[", i, "] has dtype ", mask->scalar_type(),
                       "; expected bool");
      check_shape(op, "masks", i, *mask, out.sizes(), "params[:, ...]");
      mask_data = static_cast<const uint8_t*>(mask->const_data_ptr());
    }
    if (out.numel() == 0) {
      continue;
    }
    auto [group, added] = groups.try_emplace(key);
    if (added) {
      order.push_back(key);
    }
    group->second.push_back({p.const_data_ptr(), out.data_ptr(), mask_data, out.numel()});
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& key : order) {
    C10_CUDA_CHECK(launch_swa_update(groups[key], key.first, key.second, particles, n_averaged,
                                     device.index(), stream));
  }
}

}  // namespace
}  // namespace swamp

TORCH_LIBRARY_FRAGMENT(swamp_kernels, m) {
  m.def("swa_update_(Tensor(a!)[] swa, Tensor[] params, int n_averaged, Tensor?[] masks) -> ()");
}

TORCH_LIBRARY_IMPL(swamp_kernels, CUDA, m) {
  m.impl("swa_update_", &swamp::swa_update_);
}
