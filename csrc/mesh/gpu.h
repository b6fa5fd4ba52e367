// The CUDA side of the mesh: IPC handles for GPU buffers of one host, copies on
// copy engines, and readiness through stream memory operations (write-value /
// wait-value), so a transfer and its signal use no SM and never block the CPU.
// Driver calls go through afdkit::driver_fn: nothing here links libcuda.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace afdkit::mesh::gpu {

// An IPC handle (64 bytes) of the allocation holding `ptr`, and ptr's offset in it:
// caching allocators hand out pieces of larger allocations.
std::string export_handle(void* ptr, size_t* offset);
// Maps a peer's allocation into this process (on the current device); returns its base.
void* open_handle(const std::string& handle, int device);
void close_handle(void* base);

// dst <- src on `stream` by a copy engine (any direction; UVA pointers).
void copy_async(void* dst, const void* src, size_t nbytes, cudaStream_t stream);
// *word = value once all prior work on `stream` is done; a system-wide fence
// orders the data before the signal (the default flag of cuStreamWriteValue64).
void write_value(cudaStream_t stream, uint64_t* word, uint64_t value);
// Later work on `stream` waits until *word >= value; the host returns at once.
void wait_value(cudaStream_t stream, const uint64_t* word, uint64_t value);
// The hot-path forms: `word` is already a device address (device memory, a peer's
// IPC-mapped memory, or mapped host memory from alloc_mapped_words). `fence` is kept
// for callers but every write is fenced: the v2 memory-op API refuses the no-barrier flag.
void write_value_raw(cudaStream_t stream, uint64_t* word, uint64_t value, bool fence);
void wait_value_raw(cudaStream_t stream, const uint64_t* word, uint64_t value);
// Zeroed words of pinned host memory that the GPU can write with stream memory
// operations (cudaHostAllocMapped | Portable); the host reads them without CUDA calls.
uint64_t* alloc_mapped_words(size_t n);
void free_mapped_words(uint64_t* words);
// The device-visible address of a host word (pinned/registered memory) or the word itself.
uint64_t* device_address(const uint64_t* word);
// A blocking read of a word in device memory (host waits on GPU signals, the slow path).
// It copies on a non-blocking stream of the word's device, so that a stream wait that
// the legacy default stream holds (cuStreamWaitValue64 on stream 0) cannot block it.
uint64_t read_word(const uint64_t* word);
// Stores `value` into a word in device memory (same non-blocking stream); releases a
// stream wait that timed out. Returns false on a CUDA error (nothing is thrown).
bool store_word(uint64_t* word, uint64_t value);
// The CUDA device owning a device (or pinned) pointer; -1 when it is not CUDA memory.
int device_of(const void* ptr);
// The calling thread's current device (-1 where CUDA is unavailable) / make `device` current.
int current_device();
void set_device(int device);

// Events order a CPU-posted UCX put after the caller's stream work.
cudaEvent_t record_event(cudaStream_t stream);
// true once the event completed; false while pending; throws on a CUDA error.
bool event_done(cudaEvent_t ev);
void destroy_event(cudaEvent_t ev);

}  // namespace afdkit::mesh::gpu
