// LD_PRELOAD library: the process sees an x86-64 CPU with AVX2 and neither AVX-512 nor VNNI (a Haswell-class
// CPU), so libraries that choose kernels from CPUID (ONNX Runtime's MLAS, numpy, PyTorch, oneDNN) run their
// AVX2 kernels natively, with the saturating int8 arithmetic of such a CPU.
//
// How: Linux CPUID faulting. arch_prctl(ARCH_SET_CPUID, 0) makes every CPUID instruction of this thread (and of
// the threads it starts) raise SIGSEGV; the handler below runs the real CPUID with faulting briefly off, clears
// the bits of the extensions to hide, writes the answer into the trapped thread's registers and steps over the
// instruction. Faulting is reset by execve, so each program started under LD_PRELOAD sets it up again.
//
// What stays consistent: leaf 1 keeps OSXSAVE/AVX/FMA (the OS does enable XSAVE and the YMM state, which AVX2
// detection checks with XGETBV). XGETBV cannot be trapped and still reports the AVX-512 and AMX state enabled in
// XCR0; every library checks the CPUID feature bit before XCR0, and leaf 0xD (the state components CPUID lists)
// drops the same components, so no view names an AVX-512 or AMX feature.
//
// Where the kernel or hypervisor refuses CPUID faulting, nothing is masked; with CPUMASK_STRICT set in the
// environment the process then exits 3 after one line on stderr (tests/avx2/run probes once this way).
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

typedef int (*sigaction_fn)(int, const struct sigaction *, struct sigaction *);

static sigaction_fn real_sigaction;
static struct sigaction program_handler;  // the SIGSEGV handler the program asked for, run for real faults
static int program_handler_set;
static int active;

static void cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(subleaf));
}

// r = {eax, ebx, ecx, edx} of CPUID(leaf, subleaf) → the same with AVX-512, every VNNI and AMX cleared.
static void mask(uint32_t leaf, uint32_t subleaf, uint32_t r[4]) {
    if (leaf == 7 && subleaf == 0) {
        // EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        // ECX: VBMI 1, VBMI2 6, GFNI 8, VAES 9, VPCLMULQDQ 10, AVX512_VNNI 11, BITALG 12, VPOPCNTDQ 14
        // (GFNI/VAES/VPCLMULQDQ: a Haswell-class CPU has none of them)
        r[2] &= ~(BIT(1) | BIT(6) | BIT(8) | BIT(9) | BIT(10) | BIT(11) | BIT(12) | BIT(14));
        // EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23, AMX_TILE 24, AMX_INT8 25
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && subleaf == 1) {
        // EAX: AVX_VNNI 4, AVX512_BF16 5, AMX_FP16 21, AVX_IFMA 23
        r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        // EDX: AVX_VNNI_INT8 4, AVX_NE_CONVERT 5, AMX_COMPLEX 8, AVX_VNNI_INT16 10, AVX10 19
        r[3] &= ~(BIT(4) | BIT(5) | BIT(8) | BIT(10) | BIT(19));
    } else if (leaf == 0xd && subleaf == 0) {
        // XSAVE state components: opmask 5, ZMM_Hi256 6, Hi16_ZMM 7, XTILECFG 17, XTILEDATA 18
        r[0] &= ~(BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18));
    } else if ((leaf == 0xd && (subleaf == 5 || subleaf == 6 || subleaf == 7 || subleaf == 17 || subleaf == 18))
               || leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0;  // those components' sizes, the AMX tile leaves, the AVX10 leaf
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = (ucontext_t *)context;
    greg_t *g = uc->uc_mcontext.gregs;
    // a faulting CPUID is a general-protection fault (SI_KERNEL); memory faults have their own codes
    if (active && info->si_code == SI_KERNEL) {
        const unsigned char *ip = (const unsigned char *)g[REG_RIP];
        if (ip[0] == 0x0f && ip[1] == 0xa2) {
            uint32_t r[4], leaf = (uint32_t)g[REG_RAX], subleaf = (uint32_t)g[REG_RCX];
            syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
            cpuid(leaf, subleaf, r);
            syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
            mask(leaf, subleaf, r);
            g[REG_RAX] = r[0];
            g[REG_RBX] = r[1];
            g[REG_RCX] = r[2];
            g[REG_RDX] = r[3];
            g[REG_RIP] += 2;
            return;
        }
    }
    if (program_handler_set && (program_handler.sa_flags & SA_SIGINFO)) {
        program_handler.sa_sigaction(sig, info, context);
        return;
    }
    if (program_handler_set && program_handler.sa_handler != SIG_DFL && program_handler.sa_handler != SIG_IGN) {
        program_handler.sa_handler(sig);
        return;
    }
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &dfl, NULL);  // a real fault: returning re-runs the instruction, which now kills
}

// The program's own SIGSEGV handlers (Python's faulthandler, ...) are kept behind this one.
int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction) real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV || !active) return real_sigaction(sig, act, old);
    if (old) {
        memset(old, 0, sizeof *old);
        if (program_handler_set) *old = program_handler;
    }
    if (act) {
        program_handler = *act;
        program_handler_set = 1;
    }
    return 0;
}

typedef sighandler_t (*signal_fn)(int, sighandler_t);

sighandler_t signal(int sig, sighandler_t handler) {
    if (sig != SIGSEGV || !active) {
        static signal_fn real_signal;
        if (!real_signal) real_signal = (signal_fn)dlsym(RTLD_NEXT, "signal");
        return real_signal(sig, handler);
    }
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    sigemptyset(&act.sa_mask);
    sigaction(sig, &act, &old);
    return old.sa_handler;
}

__attribute__((constructor)) static void start(void) {
    real_sigaction = (sigaction_fn)dlsym(RTLD_NEXT, "sigaction");
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        // e.g. a program that qemu-x86_64 runs (it shows its own CPU already): carry on unmasked
        if (getenv("CPUMASK_STRICT")) {
            fputs("cpumask: this machine does not allow CPUID faulting (arch_prctl ARCH_SET_CPUID)\n", stderr);
            _exit(3);
        }
        return;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    // the handler first, then faulting: a CPUID between the two would kill the process
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    real_sigaction(SIGSEGV, &sa, NULL);
    active = 1;
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
