"""Print a Linux arm64 /proc/cpuinfo for the CPU that qemu emulates; run by setup.sh under emulation.

    qemu-aarch64-static -cpu cortex-a76 -L ROOTFS ROOTFS/usr/bin/python3.11 make_cpuinfo.py NPROC

qemu 7.2 has no /proc/cpuinfo of its own for aarch64 guests, so they read the host's x86 one; ONNX Runtime's
cpuinfo library then finds no ARM core (a NULL dereference at `import onnxruntime` from 1.28 on). The file must
describe the emulated CPU itself: that library also infers features from the core's part number (a Cortex-A76
"has" dot-product even where the kernel does not say so), so a cpuinfo claiming a newer core than -cpu gives
illegal instructions. Both fields come from the emulated CPU: MIDR_EL1 read the way Linux lets user space read
it (MRS, which the kernel, and so qemu, emulates at EL0), and the feature names from AT_HWCAP/AT_HWCAP2.
"""

import ctypes
import mmap
import struct
import sys

# Bit i of AT_HWCAP / AT_HWCAP2 → the name Linux prints (arch/arm64/include/uapi/asm/hwcap.h order).
HWCAP = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop "
         "sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg").split()
HWCAP2 = ("dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm svef64mm svebf16 "
          "i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 smei8i32 smef16f32 smeb16f32 "
          "smef32f32 smefa64 wfxt ebf16 sveebf16").split()
AT_HWCAP, AT_HWCAP2 = 16, 26


def read_midr() -> int:
    code = struct.pack("<II", 0xD5380000, 0xD65F03C0)  # mrs x0, midr_el1; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    return ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()


def main() -> None:
    nproc = int(sys.argv[1])
    with open("/proc/self/auxv", "rb") as f:  # qemu serves the guest's auxv here
        auxv = dict(struct.iter_unpack("<QQ", f.read()))
    names = [n for i, n in enumerate(HWCAP) if auxv.get(AT_HWCAP, 0) >> i & 1]
    names += [n for i, n in enumerate(HWCAP2) if auxv.get(AT_HWCAP2, 0) >> i & 1]
    midr = read_midr()
    for i in range(nproc):
        print(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {' '.join(names)}\n"
              f"CPU implementer\t: {midr >> 24 & 0xFF:#04x}\nCPU architecture: 8\n"
              f"CPU variant\t: {midr >> 20 & 0xF:#x}\nCPU part\t: {midr >> 4 & 0xFFF:#05x}\n"
              f"CPU revision\t: {midr & 0xF}\n")


if __name__ == "__main__":
    main()
