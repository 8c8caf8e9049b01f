/*
 * threads.c - a small persistent pthreads pool (no OpenMP, so the library
 * coexists with whatever runtime torch loaded).
 *
 * One run at a time owns the pool (run_mu); a caller that finds it busy runs
 * its jobs on its own thread.  Workers spin briefly after a run (back-to-back
 * kernel calls then start without a futex round trip) and then sleep on a
 * condition variable.  Every worker acknowledges every run, so a worker can
 * never lag a generation behind.  Thread-count changes stop the workers; the
 * next run starts the new number lazily.  A fork() child starts with no
 * workers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "fxs_internal.h"

/* A waiting runner spins (pause) for SPIN_NS, then yields the CPU between
 * checks until YIELD_NS, then sleeps on a condition variable (it waits only
 * for the last jobs of its own call).  Idle workers spin for idle_spin_ns
 * (default 0: they sleep at once, so no spinning pool sits beside torch's or
 * onnxruntime's threads between calls; fxs_set_pool_spin_us raises it). */
#define SPIN_NS 20000L
#define YIELD_NS 100000L
#define MAX_IDLE_SPIN_US 100000

static long idle_spin_ns = -1; /* atomic; -1: not read from the environment yet */

/* The caller's parallel-for of the current fxs_*_ex call on this thread. */
static __thread const fxs_exec *tls_exec;

void fxs_set_thread_exec(const fxs_exec *exec) { tls_exec = exec; }

static long idle_spin(void)
{
    long v = __atomic_load_n(&idle_spin_ns, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *s = getenv("FXSHIFT_POOL_SPIN_US");
        char *end = NULL;
        long us = s && *s ? strtol(s, &end, 10) : 0;
        if (!s || !*s || end == s || *end != '\0' || us < 0 || us > MAX_IDLE_SPIN_US)
            us = 0;
        v = us * 1000L;
        __atomic_store_n(&idle_spin_ns, v, __ATOMIC_RELAXED);
    }
    return v;
}

int fxs_set_pool_spin_us(int us)
{
    if (us < 0 || us > MAX_IDLE_SPIN_US)
        return FXS_ERR_THREADS;
    __atomic_store_n(&idle_spin_ns, (long)us * 1000L, __ATOMIC_RELAXED);
    return FXS_OK;
}

static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER; /* owns the pool during a run */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;     /* guards the condition waits */
static pthread_cond_t cv_start = PTHREAD_COND_INITIALIZER;
static pthread_cond_t cv_done = PTHREAD_COND_INITIALIZER;

static int requested_threads;         /* 0: default */
static int default_threads;           /* resolved once */
static int n_workers;                 /* started worker threads (tids 1..n_workers) */
static pthread_t workers[FXS_MAX_THREADS];
static unsigned long generation;      /* atomic: bumped to start a run */
static int shutting_down;             /* atomic */
static unsigned long spawn_generation; /* generation when the workers were created */

/* The current run, written before generation is bumped. */
static fxs_job_fn run_fn;
static void *run_ctx;
static int64_t run_jobs;
static int64_t run_next;              /* atomic job counter */
static int run_threads;               /* tids < run_threads take jobs */
static int run_pending;               /* atomic: workers yet to acknowledge */

static inline void cpu_relax(void)
{
#if FXS_X86 && defined(__GNUC__)
    __builtin_ia32_pause();
#endif
}

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static int parse_threads_env(void)
{
    const char *s = getenv("FXSHIFT_NUM_THREADS");
    char *end = NULL;
    long v;
    if (!s || !*s)
        return 0;
    v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 1 || v > FXS_MAX_THREADS)
        return 0;
    return (int)v;
}

static int cpu_count(void)
{
    int n = 0;
#ifdef CPU_COUNT
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0)
        n = CPU_COUNT(&set);
#endif
    if (n < 1) {
        long v = sysconf(_SC_NPROCESSORS_ONLN);
        n = v > 0 ? (int)v : 1;
    }
    return n > FXS_MAX_THREADS ? FXS_MAX_THREADS : n;
}

static int resolved_threads(void)
{
    int r = __atomic_load_n(&requested_threads, __ATOMIC_RELAXED);
    int d;
    if (r > 0)
        return r;
    d = __atomic_load_n(&default_threads, __ATOMIC_RELAXED);
    if (d == 0) {
        d = parse_threads_env();
        if (d == 0)
            d = cpu_count();
        __atomic_store_n(&default_threads, d, __ATOMIC_RELAXED);
    }
    return d;
}

static void run_jobs_as(int tid)
{
    int64_t j;
    while ((j = __atomic_fetch_add(&run_next, 1, __ATOMIC_RELAXED)) < run_jobs)
        run_fn(run_ctx, j, tid);
}

static void *worker_main(void *arg)
{
    int tid = (int)(intptr_t)arg;
    /* Not the current generation: the run that created this worker may have
     * been started before the thread got scheduled. */
    unsigned long seen = spawn_generation;
    for (;;) {
        unsigned long g;
        long t0 = now_ns(), spin_ns = idle_spin();
        int spins = 0;
        /* Wait for the next generation: spin up to spin_ns, then sleep. */
        for (;;) {
            long dt;
            g = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
            if (g != seen || __atomic_load_n(&shutting_down, __ATOMIC_ACQUIRE))
                break;
            if (spin_ns > 0) {
                cpu_relax();
                if (++spins % 64 != 0)
                    continue;
            }
            dt = now_ns() - t0;
            if (dt >= spin_ns) {
                pthread_mutex_lock(&mu);
                while ((g = __atomic_load_n(&generation, __ATOMIC_ACQUIRE)) == seen &&
                       !__atomic_load_n(&shutting_down, __ATOMIC_ACQUIRE))
                    pthread_cond_wait(&cv_start, &mu);
                pthread_mutex_unlock(&mu);
                break;
            }
        }
        if (__atomic_load_n(&shutting_down, __ATOMIC_ACQUIRE))
            return NULL;
        seen = g;
        if (tid < run_threads)
            run_jobs_as(tid);
        if (__atomic_sub_fetch(&run_pending, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&mu);
            pthread_cond_broadcast(&cv_done);
            pthread_mutex_unlock(&mu);
        }
    }
}

/* Called with run_mu held. */
static void stop_workers(void)
{
    int i;
    if (n_workers == 0)
        return;
    pthread_mutex_lock(&mu);
    __atomic_store_n(&shutting_down, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&cv_start);
    pthread_mutex_unlock(&mu);
    for (i = 0; i < n_workers; ++i)
        pthread_join(workers[i], NULL);
    n_workers = 0;
    __atomic_store_n(&shutting_down, 0, __ATOMIC_RELEASE);
}

/* Called with run_mu held: make n_workers == want (or as many as could start). */
static void ensure_workers(int want)
{
    if (n_workers > want)
        stop_workers();
    spawn_generation = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
    while (n_workers < want) {
        pthread_attr_t attr;
        int ok;
        pthread_attr_init(&attr);
        pthread_attr_setstacksize(&attr, 1 << 20);
        ok = pthread_create(&workers[n_workers], &attr, worker_main,
                            (void *)(intptr_t)(n_workers + 1)) == 0;
        pthread_attr_destroy(&attr);
        if (!ok)
            break;
        ++n_workers;
    }
}

/* A run on the caller's parallel-for: body(i) is worker i (tid i), taking
 * jobs from a shared counter. */
typedef struct ext_run {
    fxs_job_fn fn;
    void *ctx;
    int64_t n_jobs;
    int64_t next; /* atomic */
} ext_run;

static void ext_body(void *arg, int64_t i)
{
    ext_run *r = (ext_run *)arg;
    int64_t j;
    while ((j = __atomic_fetch_add(&r->next, 1, __ATOMIC_RELAXED)) < r->n_jobs)
        r->fn(r->ctx, j, (int)i);
}

int fxs_planned_threads(void)
{
    const fxs_exec *e = tls_exec;
    if (e && e->parallel_for && e->max_threads > 0)
        return e->max_threads;
    return resolved_threads();
}

void fxs_parallel(int64_t n_jobs, int max_tids, fxs_job_fn fn, void *ctx)
{
    int64_t j;
    int nt;
    const fxs_exec *e = tls_exec;
    if (n_jobs <= 0)
        return;
    nt = fxs_planned_threads();
    if (nt > max_tids)
        nt = max_tids;
    if ((int64_t)nt > n_jobs)
        nt = (int)n_jobs;
    if (e && e->parallel_for && nt > 1) {
        ext_run r;
        r.fn = fn;
        r.ctx = ctx;
        r.n_jobs = n_jobs;
        r.next = 0;
        e->parallel_for(e->runner, nt, ext_body, &r);
        /* Jobs a misbehaving parallel-for left out run here (tid 0 is free now). */
        while ((j = __atomic_fetch_add(&r.next, 1, __ATOMIC_RELAXED)) < n_jobs)
            fn(ctx, j, 0);
        return;
    }
    if (nt <= 1 || pthread_mutex_trylock(&run_mu) != 0) {
        for (j = 0; j < n_jobs; ++j)
            fn(ctx, j, 0);
        return;
    }
    ensure_workers(resolved_threads() - 1);
    if (n_workers == 0) {
        pthread_mutex_unlock(&run_mu);
        for (j = 0; j < n_jobs; ++j)
            fn(ctx, j, 0);
        return;
    }
    if (nt > n_workers + 1)
        nt = n_workers + 1;
    run_fn = fn;
    run_ctx = ctx;
    run_jobs = n_jobs;
    run_threads = nt;
    __atomic_store_n(&run_next, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&run_pending, n_workers, __ATOMIC_RELAXED);
    pthread_mutex_lock(&mu);
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&cv_start);
    pthread_mutex_unlock(&mu);

    run_jobs_as(0);

    {
        long t0 = now_ns();
        int spins = 0;
        while (__atomic_load_n(&run_pending, __ATOMIC_ACQUIRE) != 0) {
            long dt;
            cpu_relax();
            if (++spins % 64 != 0)
                continue;
            dt = now_ns() - t0;
            if (dt > SPIN_NS && dt <= YIELD_NS)
                sched_yield();
            if (dt > YIELD_NS) {
                pthread_mutex_lock(&mu);
                while (__atomic_load_n(&run_pending, __ATOMIC_ACQUIRE) != 0)
                    pthread_cond_wait(&cv_done, &mu);
                pthread_mutex_unlock(&mu);
                break;
            }
        }
    }
    pthread_mutex_unlock(&run_mu);
}

int fxs_set_num_threads(int n)
{
    if (n < 0 || n > FXS_MAX_THREADS)
        return FXS_ERR_THREADS;
    pthread_mutex_lock(&run_mu);
    __atomic_store_n(&requested_threads, n, __ATOMIC_RELAXED);
    if (n_workers != resolved_threads() - 1)
        stop_workers(); /* the next run starts the new number */
    pthread_mutex_unlock(&run_mu);
    return FXS_OK;
}

int fxs_get_num_threads(void) { return resolved_threads(); }

/* fork(): wait for a running kernel, and give the child a pool with no workers
 * (its copies of the worker threads do not exist). */
static void atfork_prepare(void) { pthread_mutex_lock(&run_mu); }
static void atfork_parent(void) { pthread_mutex_unlock(&run_mu); }
static void atfork_child(void)
{
    n_workers = 0;
    shutting_down = 0;
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv_start, NULL);
    pthread_cond_init(&cv_done, NULL);
    pthread_mutex_unlock(&run_mu);
}

__attribute__((constructor)) static void pool_init(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* dlclose()/exit: the workers must not outlive the code they run. */
__attribute__((destructor)) static void pool_fini(void)
{
    if (pthread_mutex_trylock(&run_mu) == 0) {
        stop_workers();
        pthread_mutex_unlock(&run_mu);
    }
}

/* ---- scratch memory --------------------------------------------------------- */
void *fxs_alloc(size_t bytes)
{
    void *p = NULL;
    if (bytes == 0)
        bytes = 64;
    if (bytes > ((size_t)1 << 46))
        return NULL;
    if (posix_memalign(&p, 64, (bytes + 63) & ~(size_t)63) != 0)
        return NULL;
    return p;
}

void fxs_free(void *p) { free(p); }

size_t fxs_bytes3(int64_t a, int64_t b, int64_t c)
{
    int64_t r;
    if (a < 0 || b < 0 || c < 0 || !fxs_mul_ok(a, b, &r) || !fxs_mul_ok(r, c, &r))
        return SIZE_MAX;
    if ((uint64_t)r > (uint64_t)SIZE_MAX)
        return SIZE_MAX;
    return (size_t)r;
}
