// A CPU emulation of the CUDA execution model, just large enough for kdseq's kernels: every CUDA
// thread is a host thread, __syncthreads / cluster.sync are real barriers, warp shuffles exchange
// values through a per-warp buffer between two barriers, shared memory is per CTA (declared with
// KDSEQ_SHARED), and a cluster's CTAs run at the same time and can map each other's shared memory.
//
// What it checks: indexing, tails, reductions, cluster exchanges, the last-CTA reduction, and that
// every lane of a warp takes part in each shuffle (a lane that skips one leaves the others waiting:
// the test times out instead of passing by luck). What it does not: timing, memory coalescing,
// hardware exponentials (the host polynomial of row_math.h runs instead).
//
// Dynamic shared memory is a per-CTA buffer of the launch's size, filled with NaN bytes like the
// static arrays. Asynchronous copies to shared memory (cp_async16) land when the issuing thread
// waits for them, not before: a read that misses the wait or the barrier after it sees NaN.
//
// Clusters (or single CTAs when no cluster is used) run one after another, in launch order.
#pragma once

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <typeinfo>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#ifndef __restrict__
#define __restrict__ __restrict
#endif

namespace kdseq_emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

struct Warp {
  explicit Warp(unsigned lanes) : bar(lanes) {}
  std::barrier<> bar;
  uint64_t slot[32] = {};
};

struct Cta {
  Cta(unsigned threads, size_t dyn_bytes)
      : bar(threads), dyn(new (std::align_val_t(64)) unsigned char[dyn_bytes + 1]), dyn_bytes(dyn_bytes) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w)
      warps.emplace_back(std::make_unique<Warp>(std::min(32u, threads - 32 * w)));
    std::memset(dyn.get(), 0xff, dyn_bytes + 1);
  }
  std::barrier<> bar;
  std::unique_ptr<unsigned char[]> dyn;  // dynamic shared memory
  size_t dyn_bytes;
  std::vector<std::unique_ptr<Warp>> warps;
  struct Key {
    int line;
    size_t type;
    size_t bytes;
    bool operator<(const Key& o) const { return std::tie(line, type, bytes) < std::tie(o.line, o.type, o.bytes); }
  };
  std::mutex mu;
  std::map<Key, std::unique_ptr<unsigned char[]>> smem;

  unsigned char* get(const Key& k) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = smem.find(k);
    if (it == smem.end()) {
      std::unique_ptr<unsigned char[]> buf(new (std::align_val_t(64)) unsigned char[k.bytes]);
      // Uninitialized on a GPU: fill with NaN bytes so a read before any write shows.
      std::memset(buf.get(), 0xff, k.bytes);
      it = smem.emplace(k, std::move(buf)).first;
    }
    return it->second.get();
  }
};

struct Cluster {
  Cluster(unsigned ctas, unsigned threads, size_t dyn_bytes) : bar(ctas * threads) {
    for (unsigned i = 0; i < ctas; ++i) members.emplace_back(std::make_unique<Cta>(threads, dyn_bytes));
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<Cta>> members;
};

struct ThreadState {
  Dim3 thread, block, block_dim, grid_dim;
  Cta* cta = nullptr;
  Cluster* cluster = nullptr;
  unsigned cluster_rank = 0;
};

inline thread_local ThreadState tls;

template <typename T, size_t N>
T* cta_shared(int line) {
  return reinterpret_cast<T*>(tls.cta->get({line, typeid(T).hash_code(), sizeof(T) * N}));
}

inline unsigned char* dyn_shared() { return tls.cta->dyn.get(); }

// This thread's copies in flight: (shared destination, global source) of 16 bytes each.
inline thread_local std::vector<std::pair<void*, const void*>> pending_copies;

// Copies go to dynamic shared memory only (the one use): a destination outside it is a bug.
inline void cp_async16(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    std::fprintf(stderr, "kdseq_emu: cp_async16 of an address not 16-byte aligned\n");
    std::abort();
  }
  const unsigned char* d = static_cast<const unsigned char*>(dst);
  if (d < tls.cta->dyn.get() || d + 16 > tls.cta->dyn.get() + tls.cta->dyn_bytes) {
    std::fprintf(stderr, "kdseq_emu: cp_async16 outside the dynamic shared memory\n");
    std::abort();
  }
  pending_copies.emplace_back(dst, src);
}

inline void cp_async_wait_all() {
  for (const auto& [dst, src] : pending_copies) std::memcpy(dst, src, 16);
  pending_copies.clear();
}

inline void sync_threads() { tls.cta->bar.arrive_and_wait(); }

template <typename T>
T shfl_xor(T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  const unsigned lane = tls.thread.x % 32;
  Warp& w = *tls.cta->warps[tls.thread.x / 32];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[lane] = bits;
  w.bar.arrive_and_wait();
  const uint64_t other = w.slot[(lane ^ static_cast<unsigned>(lane_mask)) & 31u];
  w.bar.arrive_and_wait();  // nobody overwrites a slot before every lane has read
  T out;
  std::memcpy(&out, &other, sizeof(T));
  return out;
}

inline void fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned atomic_add(unsigned* p, unsigned v) {
  return std::atomic_ref<unsigned>(*p).fetch_add(v, std::memory_order_seq_cst);
}

inline unsigned cluster_rank() { return tls.cluster_rank; }
inline unsigned cluster_size() { return static_cast<unsigned>(tls.cluster->members.size()); }
inline void cluster_sync() { tls.cluster->bar.arrive_and_wait(); }

template <typename T>
T* cluster_map(T* p, unsigned rank) {
  Cta& mine = *tls.cta;
  const unsigned char* addr = reinterpret_cast<const unsigned char*>(p);
  Cta::Key key{};
  size_t offset = 0;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mine.mu);
    for (auto& [k, buf] : mine.smem) {
      if (addr >= buf.get() && addr < buf.get() + k.bytes) {
        key = k;
        offset = static_cast<size_t>(addr - buf.get());
        found = true;
        break;
      }
    }
  }
  if (!found || rank >= tls.cluster->members.size()) {
    std::fprintf(stderr, "kdseq_emu: cluster_map of a pointer outside shared memory or rank %u\n", rank);
    std::abort();
  }
  return reinterpret_cast<T*>(tls.cluster->members[rank]->get(key) + offset);
}

[[noreturn]] inline void unreachable() {
  std::fprintf(stderr, "kdseq_emu: a kernel reached dev::unreachable()\n");
  std::abort();
}

struct LaunchDims {
  unsigned grid = 1, block = 1, cluster = 1;
  size_t smem = 0;  // dynamic shared memory per CTA, bytes
};

// Runs kernel(args...) on grid x block threads, cluster CTAs at a time.
template <typename Kernel, typename... Args>
void launch(const LaunchDims& d, Kernel kernel, Args... args) {
  if (d.grid == 0) return;
  if (d.cluster == 0 || d.grid % d.cluster != 0)
    throw std::runtime_error("kdseq_emu: grid must be a multiple of the cluster size");
  for (unsigned first = 0; first < d.grid; first += d.cluster) {
    Cluster cl(d.cluster, d.block, d.smem);
    struct Job {
      ThreadState st;
      std::function<void()> body;
    };
    std::vector<Job> jobs;
    jobs.reserve(static_cast<size_t>(d.cluster) * d.block);
    for (unsigned c = 0; c < d.cluster; ++c) {
      for (unsigned t = 0; t < d.block; ++t) {
        ThreadState st;
        st.thread = {t, 0, 0};
        st.block = {first + c, 0, 0};
        st.block_dim = {d.block, 1, 1};
        st.grid_dim = {d.grid, 1, 1};
        st.cta = cl.members[c].get();
        st.cluster = &cl;
        st.cluster_rank = c;
        jobs.push_back({st, [=]() { kernel(args...); }});
      }
    }
    std::vector<pthread_t> threads(jobs.size());
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 1 << 20);
    for (size_t i = 0; i < jobs.size(); ++i) {
      auto entry = [](void* p) -> void* {
        Job* job = static_cast<Job*>(p);
        tls = job->st;
        job->body();
        return nullptr;
      };
      if (pthread_create(&threads[i], &attr, entry, &jobs[i]) != 0) {
        std::fprintf(stderr, "kdseq_emu: pthread_create failed\n");
        std::abort();
      }
    }
    for (auto& th : threads) pthread_join(th, nullptr);
    pthread_attr_destroy(&attr);
  }
}

}  // namespace kdseq_emu

#define threadIdx (::kdseq_emu::tls.thread)
#define blockIdx (::kdseq_emu::tls.block)
#define blockDim (::kdseq_emu::tls.block_dim)
#define gridDim (::kdseq_emu::tls.grid_dim)
#define __syncthreads() ::kdseq_emu::sync_threads()
