// global_magnitude_prune / layerwise_magnitude_prune: schemas, input checks and CUDA
// registration (kernels: magnitude_prune.cu).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "magnitude_prune.h"
#include "tensor_checks.h"

namespace swamp {
namespace {

PruneDtype prune_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kPruneFloat32;
    case at::kHalf:
      return kPruneFloat16;
    default:
      return kPruneBFloat16;
  }
}

// New contiguous bool masks keeping, per segment (all tensors, or each one when
// `layerwise`), the largest keys among the candidates (masks[i] true; every entry when
// `masks` is empty); see magnitude_prune.h. Also returns the int64 status
// [n per segment..., NaN/Inf-candidate flag per tensor], for the caller to read once.
std::tuple<std::vector<at::Tensor>, at::Tensor> magnitude_prune(const char* op, at::TensorList keys,
                                                                 at::TensorList masks, double amount,
                                                                 bool amount_is_count, bool signed_keys,
                                                                 bool layerwise) {
  TORCH_CHECK_VALUE(!keys.empty(), op, ": keys is empty");
  TORCH_CHECK_VALUE(masks.empty() || masks.size() == keys.size(), op, ": ", keys.size(), " keys but ", masks.size(),
                    " masks");
  TORCH_CHECK_VALUE(amount >= 0.0 && (amount_is_count || amount <= 1.0), op, ": amount=", amount,
                    " must be a fraction in [0, 1] or a count >= 0");
  const c10::Device device = keys[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": keys[0] is on ", device, ", expected a CUDA device");
  const c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> out;
  std::vector<PruneTensor> tensors;
  out.reserve(keys.size());
  tensors.reserve(keys.size());
  for (size_t i = 0; i < keys.size(); ++i) {
    const at::Tensor& k = keys[i];
    check_dense_on(op, "keys", i, k, device);
    check_float(op, "keys", i, k);
    const uint8_t* mask = nullptr;
    if (!masks.empty()) {
      const at::Tensor& m = masks[i];
      check_dense_on(op, "masks", i, m, device);
      TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, op, ": masks[", i, "] has dtype ", m.scalar_type(),
                       "; expected bool");
      TORCH_CHECK_VALUE(m.sizes() == k.sizes(), op, ": masks[", i, "] has shape ", m.sizes(), "; expected ",
                        k.sizes(), " like keys[", i, "]");
      mask = static_cast<const uint8_t*>(m.const_data_ptr());
    }
    out.push_back(at::empty(k.sizes(), k.options().dtype(at::kBool)));
    tensors.push_back({k.const_data_ptr(), mask, static_cast<uint8_t*>(out.back().data_ptr()), k.numel(),
                       prune_dtype(k)});
  }
  const int64_t segments = layerwise ? static_cast<int64_t>(keys.size()) : 1;
  at::Tensor status = at::empty({segments + static_cast<int64_t>(keys.size())}, keys[0].options().dtype(at::kLong));
  const at::Tensor workspace = at::empty({static_cast<int64_t>(magnitude_prune_workspace_bytes(tensors, layerwise))},
                                         keys[0].options().dtype(at::kByte));
  const PruneParams params{amount, amount_is_count, signed_keys, layerwise};
  C10_CUDA_CHECK(launch_magnitude_prune(tensors, params, workspace.data_ptr(), status.data_ptr<int64_t>(),
                                        device.index(), c10::cuda::getCurrentCUDAStream().stream()));
  return {std::move(out), std::move(status)};
}

std::tuple<std::vector<at::Tensor>, at::Tensor> global_magnitude_prune(at::TensorList keys, at::TensorList masks,
                                                                        double amount, bool amount_is_count,
                                                                        bool signed_keys) {
  return magnitude_prune("global_magnitude_prune", keys, masks, amount, amount_is_count, signed_keys, false);
}

std::tuple<std::vector<at::Tensor>, at::Tensor> layerwise_magnitude_prune(at::TensorList keys, at::TensorList masks,
                                                                           double amount, bool amount_is_count,
                                                                           bool signed_keys) {
  return magnitude_prune("layerwise_magnitude_prune", keys, masks, amount, amount_is_count, signed_keys, true);
}

}  // namespace
}  // namespace swamp

TORCH_LIBRARY_FRAGMENT(swamp_kernels, m) {
  m.def("global_magnitude_prune(Tensor[] keys, Tensor[] masks, float amount, bool amount_is_count, "
        "bool signed_keys) -> (Tensor[], Tensor)");
  m.def("layerwise_magnitude_prune(Tensor[] keys, Tensor[] masks, float amount, bool amount_is_count, "
        "bool signed_keys) -> (Tensor[], Tensor)");
}

TORCH_LIBRARY_IMPL(swamp_kernels, CUDA, m) {
  m.impl("global_magnitude_prune", &swamp::global_magnitude_prune);
  m.impl("layerwise_magnitude_prune", &swamp::layerwise_magnitude_prune);
}
