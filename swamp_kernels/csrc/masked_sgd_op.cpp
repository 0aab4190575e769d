// masked_sgd_step_: schema, input checks and CUDA registration (kernel: masked_sgd.cu).
//
// One torch.optim.SGD step on grad * mask, then param *= mask, over a list of contiguous
// params; one kernel launch per (param dtype, grad dtype) pair, in first-seen order. The
// caller allocates the momentum buffers of a first step (first_step[i]) and the kernel
// writes them; without momentum, momentum_buffers and first_step are empty.
#include <map>
#include <optional>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "masked_sgd.h"
#include "tensor_checks.h"

namespace swamp {
namespace {

void masked_sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                      const c10::List<bool>& first_step, const c10::List<std::optional<at::Tensor>>& masks,
                      double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                      bool maximize) {
  constexpr const char* op = "masked_sgd_step_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(n > 0, op, ": params is empty");
  TORCH_CHECK_VALUE(grads.size() == n, op, ": ", grads.size(), " grads but ", n, " params");
  TORCH_CHECK_VALUE(masks.size() == n, op, ": ", masks.size(), " masks but ", n, " params");
  const bool use_momentum = momentum != 0;
  const size_t n_buffers = use_momentum ? n : 0;
  TORCH_CHECK_VALUE(momentum_buffers.size() == n_buffers && first_step.size() == n_buffers, op, ": ",
                    momentum_buffers.size(), " momentum_buffers and ", first_step.size(),
                    " first_step flags; expected ",
                    n_buffers, " (one per param with momentum, none without)");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    ": nesterov momentum requires momentum > 0 and dampening == 0");
  check_distinct(op, {{"params", params}, {"momentum_buffers", momentum_buffers}});
  const c10::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": params[0] is on ", device, ", expected a CUDA device");
  std::map<std::pair<FloatType, FloatType>, std::vector<SgdEntry>> groups;
  std::vector<std::pair<FloatType, FloatType>> order;  // launch groups in first-seen order
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    check_dense_on(op, "params", i, p, device);
    check_dense_on(op, "grads", i, g, device);
    check_shape(op, "grads", i, g, p.sizes(), "params");
    const auto key = std::make_pair(float_type(op, "params", i, p), float_type(op, "grads", i, g));
    TORCH_CHECK_TYPE(key.first == key.second || key.first == FloatType::kFloat32, op, ": grads[", i, "] has dtype ",
                     g.scalar_type(), " but params[", i, "] has ", p.scalar_type(),
                     "; mixed dtypes need float32 params");
    void* buffer = nullptr;
    if (use_momentum) {
      const at::Tensor& b = momentum_buffers[i];
      check_dense_on(op, "momentum_buffers", i, b, device);
      check_shape(op, "momentum_buffers", i, b, p.sizes(), "params");
      TORCH_CHECK_TYPE(b.scalar_type() == p.scalar_type(), op, ": momentum_buffers[", i, "] has dtype ",
                       b.scalar_type(), "; expected ", p.scalar_type(), " like params[", i, "]");
      buffer = b.data_ptr();
    }
    const std::optional<at::Tensor> mask = masks[i];
    const uint8_t* mask_data = nullptr;
    int64_t rows = 1;
    int64_t row_numel = p.numel();
    if (mask.has_value()) {
      check_dense_on(op, "masks", i, *mask, device);
      check_mask(op, i, *mask, "params", p);
      mask_data = static_cast<const uint8_t*>(mask->const_data_ptr());
      if (mask->dim() != p.dim()) {  // broadcast over the P particles of p
        rows = p.size(0);
        row_numel = mask->numel();
      }
    }
    if (p.numel() == 0) {
      continue;
    }
    auto [group, added] = groups.try_emplace(key);
    if (added) {
      order.push_back(key);
    }
    group->second.push_back(
        {p.data_ptr(), g.const_data_ptr(), buffer, mask_data, row_numel, rows, use_momentum && first_step[i]});
  }
  const SgdOptions options{static_cast<float>(-lr),           static_cast<float>(momentum),
                           static_cast<float>(1.0 - dampening), static_cast<float>(weight_decay),
                           nesterov,
                           maximize,
                           use_momentum,
                           weight_decay != 0};
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (const auto& key : order) {
    C10_CUDA_CHECK(launch_masked_sgd(groups[key], key.first, key.second, options, device.index(), stream));
  }
}

}  // namespace
}  // namespace swamp

TORCH_LIBRARY_FRAGMENT(swamp_kernels, m) {
  m.def(
      "masked_sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, bool[] first_step, "
      "Tensor?[] masks, *, float lr, float momentum, float dampening, float weight_decay, bool nesterov, "
      "bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(swamp_kernels, CUDA, m) {
  m.impl("masked_sgd_step_", &swamp::masked_sgd_step_);
}
