// Hand-written CUDA C++ baselines for the DC-AE shortcuts (one thread per output element, fp32 math).
//   down: y[b, o, h, w] = scale * mean_{k<G} x[b, c(u), h*f + i(u), w*f + j(u)] (+ res), u = o*G + k,
//         c = u / (f*f), i = (u / f) % f, j = u % f
//   up:   y[b, c, h, w] = scale * x[b, (c*f*f + (h%f)*f + w%f) / R, h/f, w/f] (+ res)
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

template <typename T>
__global__ void down_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                            int64_t total, int C, int Co, int HL, int WL, int f, int G, float scale) {
  const int64_t W = (int64_t)WL * f, plane = (int64_t)HL * f * W;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int wo = idx % WL, ho = (idx / WL) % HL;
    const int64_t bo = idx / ((int64_t)WL * HL);
    const int o = bo % Co;
    const int64_t b = bo / Co;
    float acc = 0.f;
    for (int k = 0; k < G; ++k) {
      const int u = o * G + k, c = u / (f * f), i = (u / f) % f, j = u % f;
      acc += static_cast<float>(x[(b * C + c) * plane + (int64_t)(ho * f + i) * W + wo * f + j]);
    }
    float v = acc * (scale / G);
    if (res) v += static_cast<float>(res[idx]);
    y[idx] = static_cast<T>(v);
  }
}

template <typename T>
__global__ void up_kernel(const T* __restrict__ x, const T* __restrict__ res, T* __restrict__ y,
                          int64_t total, int C, int Co, int HL, int WL, int f, int R, float scale) {
  const int H = HL * f, W = WL * f;
  for (int64_t idx = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; idx < total;
       idx += (int64_t)gridDim.x * blockDim.x) {
    const int w = idx % W, h = (idx / W) % H;
    const int64_t bc = idx / ((int64_t)W * H);
    const int c = bc % Co;
    const int64_t b = bc / Co;
    const int ci = (c * f * f + (h % f) * f + w % f) / R;
    float v = static_cast<float>(x[((b * C + ci) * HL + h / f) * (int64_t)WL + w / f]) * scale;
    if (res) v += static_cast<float>(res[idx]);
    y[idx] = static_cast<T>(v);
  }
}

static void check(const torch::Tensor& x, const c10::optional<torch::Tensor>& res) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(), "x: contiguous 4-d CUDA tensor expected");
  if (res) TORCH_CHECK(res->is_contiguous() && res->dtype() == x.dtype(), "res: contiguous, x's dtype");
}

static int blocks_for(int64_t total) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return (int)std::max<int64_t>(1, std::min<int64_t>((total + 255) / 256, (int64_t)sms * 32));
}

torch::Tensor down(torch::Tensor x, int64_t out_channels, int64_t f, c10::optional<torch::Tensor> res,
                   double scale) {
  check(x, res);
  const int C = x.size(1), HL = x.size(2) / f, WL = x.size(3) / f, G = C * f * f / out_channels;
  auto y = torch::empty({x.size(0), out_channels, HL, WL}, x.options());
  const int64_t total = y.numel();
  if (total == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "down", [&] {
    down_kernel<scalar_t><<<blocks_for(total), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), total, C,
        out_channels, HL, WL, f, G, (float)scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

torch::Tensor up(torch::Tensor x, int64_t out_channels, int64_t f, c10::optional<torch::Tensor> res,
                 double scale) {
  check(x, res);
  const int C = x.size(1), HL = x.size(2), WL = x.size(3), R = out_channels * f * f / C;
  auto y = torch::empty({x.size(0), out_channels, HL * f, WL * f}, x.options());
  const int64_t total = y.numel();
  if (total == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "up", [&] {
    up_kernel<scalar_t><<<blocks_for(total), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.data_ptr<scalar_t>(), res ? res->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), total, C,
        out_channels, HL, WL, f, R, (float)scale);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("down", &down, "space-to-channel + channel-average shortcut (+ residual)");
  m.def("up", &up, "channel-to-space + channel-duplicate shortcut (+ residual)");
}
