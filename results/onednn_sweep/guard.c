// LD_PRELOAD shim (results/onednn_sweep): posix_memalign / aligned_alloc / memalign blocks of >= 1 KiB end at a
// PROT_NONE page, so a write past their end faults at once instead of corrupting the heap.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#define MIN 1024
#define N (1 << 20)
static void (*real_free)(void *);
static int (*real_pm)(void **, size_t, size_t);
static struct { void *p; void *base; size_t len; } tab[N];
static volatile int lock;
static void L(void) { while (__sync_lock_test_and_set(&lock, 1)) ; }
static void U(void) { __sync_lock_release(&lock); }
static size_t H(void *p) { return ((uintptr_t)p >> 4) * 11400714819323198485ull >> 44; }
int posix_memalign(void **out, size_t align, size_t size) {
    if (!real_pm) real_pm = dlsym(RTLD_NEXT, "posix_memalign");
    if (size < MIN || align > 4096) return real_pm(out, align, size);
    if (align < 8) align = 8;
    size_t page = 4096, rs = (size + align - 1) / align * align, pages = (rs + page - 1) / page, len = (pages + 1) * page;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return ENOMEM;
    mprotect(base + pages * page, page, PROT_NONE);
    char *p = base + pages * page - rs;
    L(); size_t i = H(p) & (N - 1); while (tab[i].p) i = (i + 1) & (N - 1);
    tab[i].p = p; tab[i].base = base; tab[i].len = len; U();
    *out = p; return 0;
}
void *aligned_alloc(size_t align, size_t size) { void *p; return posix_memalign(&p, align, size) ? NULL : p; }
void *memalign(size_t align, size_t size) { void *p; return posix_memalign(&p, align, size) ? NULL : p; }
void free(void *p) {
    if (!real_free) real_free = dlsym(RTLD_NEXT, "free");
    if (p) {
        L(); size_t i = H(p) & (N - 1);
        while (tab[i].p) {
            if (tab[i].p == p) {
                void *b = tab[i].base; size_t len = tab[i].len;
                // delete with backward shift
                size_t j = i;
                for (;;) { j = (j + 1) & (N - 1); if (!tab[j].p) break;
                    size_t k = H(tab[j].p) & (N - 1);
                    if ((j > i && (k <= i || k > j)) || (j < i && (k <= i && k > j))) { tab[i] = tab[j]; i = j; } }
                tab[i].p = 0; U(); munmap(b, len); return;
            }
            i = (i + 1) & (N - 1);
        }
        U();
    }
    real_free(p);
}
