// Prepended to every kernel source (mod.rs `PRELUDE`).
//
// Programmatic dependent launch (Hopper and later): the backend launches every kernel
// with the attribute that lets it start while the kernel before it in the stream is
// still running (`FFAI_CUDA_PDL=0` turns it off). `PDL_ENTRY` is therefore the first
// statement of every kernel: `griddepcontrol.wait` blocks until the previous grid has
// finished and its writes are visible (so no kernel reads or writes anything before
// its predecessor is done: each kernel waits for the one before, which waited for the
// one before it), then `launch_dependents` lets the next kernel's blocks be scheduled
// (they too wait at their entry). What overlaps is launching, block scheduling and each
// kernel's start-up, not any memory access. Launched without the attribute (older
// GPUs, the switch off, cuBLAS kernels before ours), both instructions return at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_ENTRY()                                          \
    do {                                                     \
        asm volatile("griddepcontrol.wait;" ::: "memory");   \
        asm volatile("griddepcontrol.launch_dependents;" :::); \
    } while (0)
#else
#define PDL_ENTRY() \
    do {            \
    } while (0)
#endif
