"""Seccomp filter for one sandboxed program, through ctypes on the system's libseccomp.

Runs inside the sandbox (imported by worker.py, which cannot import the package), so it depends
on nothing but the standard library. libseccomp2 ships with every Debian (apt depends on it).
libseccomp compiles the filter once, in the template; each child binds its own pid and loads it.
The filter allows everything except what a math program never needs and an attacker always does:
new processes, exec, signals to other processes, sockets, tracing, namespaces and kernel surfaces.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

_ALLOW = 0x7FFF0000
_CMP_NE = 1
_CMP_MASKED_EQ = 7
_CLONE_THREAD = 0x00010000


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


# Denied outright (EPERM). Names unknown on this architecture (e.g. fork on aarch64) are skipped.
_DENIED = (
    "fork", "vfork", "execve", "execveat",
    "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "socket",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # io_uring requests bypass seccomp
    "open_by_handle_at", "name_to_handle_at", "fanotify_init",
)
# Signal syscalls whose first argument is a pid/tgid: allowed only when it is the program itself.
_SIGNAL_TO_PID = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def _library():
    # By soname: ctypes.util.find_library would spawn ldconfig, which the sandbox forbids.
    try:
        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


_LIB = _library()


_LIBC = ctypes.CDLL(None, use_errno=True)

# Filters are compiled once in the template with this stand-in for the program's pid, which is
# patched into the compiled BPF in each child (compiling there costs milliseconds of copy-on-write).
# It exceeds the kernel's PID_MAX_LIMIT, so it can never be a real pid.
_PID_PLACEHOLDER = 0x3A5C7E91
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_PID = struct.Struct("=I")  # its last field, k
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _add(ctx, action: int, name: str, *cmps: _ArgCmp) -> None:
    nr = _LIB.seccomp_syscall_resolve_name(name.encode())
    if nr < 0:
        return
    array = (_ArgCmp * len(cmps))(*cmps) if cmps else None
    rc = _LIB.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
    if rc != 0:
        raise OSError(-rc, f"seccomp rule for {name} rejected")


def _compile() -> bytes:
    ctx = _LIB.seccomp_init(_ALLOW)
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        eperm = _errno_action(errno.EPERM)
        for name in _DENIED:
            _add(ctx, eperm, name)
        # A clone without CLONE_THREAD is a fork; threads stay allowed (bounded by rlimits/cgroup).
        _add(ctx, eperm, "clone", _ArgCmp(0, _CMP_MASKED_EQ, _CLONE_THREAD, 0))
        # glibc falls back from clone3 to clone on ENOSYS, where the flags can be inspected.
        _add(ctx, _errno_action(errno.ENOSYS), "clone3")
        for name in _SIGNAL_TO_PID:
            _add(ctx, eperm, name, _ArgCmp(0, _CMP_NE, _PID_PLACEHOLDER, 0))
        read_fd, write_fd = os.pipe()
        try:
            rc = _LIB.seccomp_export_bpf(ctx, write_fd)
            os.close(write_fd)
            write_fd = -1
            if rc != 0:
                raise OSError(-rc, "seccomp_export_bpf failed")
            chunks = []
            while chunk := os.read(read_fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        _LIB.seccomp_release(ctx)


class Filter:
    """The compiled filter; build in the template, install() in each forked child.

    Building it also sets no_new_privs on the template (it never execs), so children inherit the
    flag, and prepares the kernel-ready program there: a child only binds its pid and loads it.
    """

    def __init__(self):
        if _LIB is None:
            raise OSError(errno.ENOSYS, "libseccomp.so.2 not found")
        bpf = _compile()
        self._pid_offsets = [off + _INSN.size - _PID.size for off in range(0, len(bpf), _INSN.size)
                             if _INSN.unpack_from(bpf, off)[3] == _PID_PLACEHOLDER]
        if not self._pid_offsets:
            raise OSError(errno.EINVAL, "compiled seccomp filter has no pid comparison to bind")
        self._prog = ctypes.create_string_buffer(bpf, len(bpf))  # each child patches its own copy
        self._fprog = _SockFprog(len(bpf) // _INSN.size, ctypes.addressof(self._prog))
        _check(_LIBC.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")

    def install(self, own_pid: int) -> None:
        """Load the filter into the calling process, bound to its pid (irreversible)."""
        for off in self._pid_offsets:
            _PID.pack_into(self._prog, off, own_pid)
        rc = _LIBC.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0)
        _check(rc, "loading the seccomp filter")


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} failed: {os.strerror(err)}")
