// Releasing and restoring the memory behind a tensor's storage, for ZeRO-3's reshard after forward: a
// kept block's gathered parameters are freed once its forward is done, although its autograd graph
// still holds them (as views of the bucket's flat buffer), and gathered again into the same storage
// before its backward. What FSDP2 does with `untyped_storage().resize_(0)`; here through c10's storage
// API, which works for every allocator (CUDA's caching allocator, the CPU's).
//
// While released, the storage holds no memory and a null data pointer: no tensor over it may be read
// (libtorch's kernels do not check), which the step's schedule guarantees (crate::step).

#include <ATen/ATen.h>

#include "fused.h"

extern "C" {

// Frees the memory behind t's storage: every tensor sharing the storage keeps its shape and offset.
char* idavlm_storage_release(const at::Tensor* t) {
  return idavlm::guarded("releasing a storage", [&] {
    c10::StorageImpl* s = t->storage().unsafeGetStorageImpl();
    s->set_data_ptr_noswap(at::DataPtr(nullptr, s->device()));
    s->set_nbytes(0);
  });
}

// Allocates nbytes for t's (released) storage again, contents undefined, and returns a tensor of t's
// shape over it with its own version counter: writing the gathered values through it leaves the version
// of the tensors an autograd graph saved unchanged (they are not modified: they are filled again).
char* idavlm_storage_restore(const at::Tensor* t, int64_t nbytes, at::Tensor** out) {
  return idavlm::guarded("restoring a storage", [&] {
    c10::StorageImpl* s = t->storage().unsafeGetStorageImpl();
    TORCH_CHECK(s->nbytes() == 0, "restoring a storage that holds ", s->nbytes(), " bytes (it was not released)");
    TORCH_CHECK(nbytes >= 0, "a storage of ", nbytes, " bytes");
    c10::Allocator* a = s->allocator();
    TORCH_CHECK(a != nullptr, "the storage has no allocator to restore it with");
    s->set_data_ptr_noswap(a->allocate(static_cast<size_t>(nbytes)));
    s->set_nbytes(static_cast<size_t>(nbytes));
    at::Tensor alias = at::empty({0}, t->options());
    alias.set_(t->storage(), t->storage_offset(), t->sizes(), t->strides());
    *out = new at::Tensor(std::move(alias));
  });
}
}
