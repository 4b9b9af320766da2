// A timeline of what the host and the GPU do, through libtorch's own profiler (Kineto over CUPTI): CPU
// ops, CUDA runtime calls and GPU kernels with their launch correlation, written as a Chrome trace.
// tch exposes none of it. Named ranges (the trainer's phases) appear as user annotations.

#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/csrc/autograd/record_function_ops.h>

#include <set>
#include <string>

#include "fused.h"

namespace {
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}
}  // namespace

extern "C" {

char* idavlm_trace_start(int cuda) {
  return idavlm::guarded("idavlm_trace_start", [&] {
    ProfilerConfig cfg(ProfilerState::KINETO);
    const auto acts = activities(cuda != 0);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
  });
}

char* idavlm_trace_stop(const char* path) {
  return idavlm::guarded("idavlm_trace_stop", [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result, "the profiler was not running");
    result->save(path);
  });
}

// Opens a named range on this thread; the handle goes to idavlm_range_end (null when it failed).
void* idavlm_range_begin(const char* name) {
  try {
    return torch::autograd::profiler::record_function_enter_new(name).release();
  } catch (...) {
    return nullptr;
  }
}

void idavlm_range_end(void* handle) {
  if (!handle) return;
  auto rec = c10::intrusive_ptr<torch::autograd::profiler::PythonRecordFunction>::reclaim(
      static_cast<torch::autograd::profiler::PythonRecordFunction*>(handle));
  try {
    rec->record.end();
  } catch (...) {
  }
}
}
