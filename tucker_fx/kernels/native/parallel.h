/* tucker_fx: how the native kernels split their work over threads.

   Built with -fopenmp (where torch runs on GNU OpenMP, as its Linux wheels do), a kernel's
   parallel region runs on the same libgomp thread pool as torch's own ops: the library is loaded
   after torch, so the dynamic linker resolves its libgomp.so.1 to the one torch loaded. Python
   threads splitting the same work (the first design) ran no faster at two threads than one, the
   other core held by torch's spinning OpenMP worker; the pool's own workers run it twice as fast
   (a 4 -> 4 narrow conv at 64^3: 2.0 ms against 2.9-4.1, docs/lowering.md). Built without
   OpenMP, the pragmas are ignored and every call runs on the calling thread.

   TFX_PARALLEL(nt, err) opens a region of nt threads whose int error codes are or-ed into err;
   inside it, tfx_span(n, &lo, &hi) gives this thread's share [lo, hi) of n jobs. */
#ifndef TFX_PARALLEL_H
#define TFX_PARALLEL_H
#ifdef _OPENMP
#include <omp.h>
#define TFX_PRAGMA(x) _Pragma(#x)
#define TFX_PARALLEL(nt, err) TFX_PRAGMA(omp parallel num_threads(nt) reduction(|:err))
static inline void tfx_span(long n, long* lo, long* hi) {
    const long t = omp_get_thread_num(), k = omp_get_num_threads();
    *lo = n * t / k;
    *hi = n * (t + 1) / k;
}
#else
#define TFX_PARALLEL(nt, err)
static inline void tfx_span(long n, long* lo, long* hi) { *lo = 0; *hi = n; }
#endif

/* Chunks per sample so that n samples give nt threads work, each chunk at least `least` of `len`. */
static inline long tfx_chunks(long n, long len, long least, int nt) {
    long k = (nt + n - 1) / n;
    if (k > len / least) k = len / least;
    return k < 1 ? 1 : k;
}

/* The fewest positions worth a thread's chunk, for a kernel doing `macs` multiply-adds per position:
   about 256K (tens of microseconds), between 256 and 4096 positions. */
static inline long tfx_least(long macs) {
    const long p = (1L << 18) / (macs > 0 ? macs : 1);
    return p < 256 ? 256 : (p > 4096 ? 4096 : p);
}

/* Threads for `jobs` jobs: at most nt, at least 1. */
static inline int tfx_team(long jobs, int nt) { return jobs < nt ? (jobs < 1 ? 1 : (int)jobs) : nt; }
#endif
