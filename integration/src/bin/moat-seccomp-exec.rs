//! `moat-seccomp-exec [--profile FILE] -- CMD [ARGS…]`: runs CMD under a seccomp filter
//! (tests only). Without `--profile`, `bpf(2)` fails with EPERM, as a locked-down container
//! runtime profile does. With `--profile`, the filter is that OCI/Docker seccomp profile
//! (the Helm chart's `files/seccomp-enforcer.json`) as a container runtime applies it on
//! x86_64: its allow-list, and every other syscall failing with its `defaultErrnoRet`.

use std::ffi::CString;

// seccomp_data: nr at 0, arch at 4.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

/// `(name, x86_64 number)` of every syscall a profile may name: an unknown name is an
/// error, so a profile is never silently narrower than it reads.
macro_rules! table {
    ($($n:ident),* $(,)?) => {
        const SYSCALLS: &[(&str, libc::c_long)] = &[$((stringify!($n), libc::$n)),*];
    };
}

table!(
    SYS_accept,
    SYS_accept4,
    SYS_access,
    SYS_arch_prctl,
    SYS_bind,
    SYS_bpf,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_epoll_create,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_epoll_wait,
    SYS_eventfd,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_flock,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getpeername,
    SYS_getpid,
    SYS_getppid,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_ioctl,
    SYS_kill,
    SYS_listen,
    SYS_lseek,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mmap,
    SYS_mount,
    SYS_mprotect,
    SYS_mremap,
    SYS_munmap,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_open,
    SYS_openat,
    SYS_openat2,
    SYS_perf_event_open,
    SYS_pidfd_open,
    SYS_pipe,
    SYS_pipe2,
    SYS_poll,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_prlimit64,
    SYS_pselect6,
    SYS_pwrite64,
    SYS_read,
    SYS_readlink,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rmdir,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sched_getaffinity,
    SYS_sched_yield,
    SYS_select,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_setgid,
    SYS_setgroups,
    SYS_setrlimit,
    SYS_setsockopt,
    SYS_setuid,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_socket,
    SYS_socketpair,
    SYS_stat,
    SYS_statfs,
    SYS_statx,
    SYS_sync_file_range,
    SYS_sysinfo,
    SYS_tgkill,
    SYS_umask,
    SYS_uname,
    SYS_unlink,
    SYS_unlinkat,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
);

fn stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | op | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

/// (allowed syscall numbers, errno for everything else) from a profile.
fn profile(path: &str) -> Result<(Vec<u32>, u32), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let p: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))?;
    if p["defaultAction"] != "SCMP_ACT_ERRNO" {
        return Err(format!(
            "{path}: only defaultAction SCMP_ACT_ERRNO is understood"
        ));
    }
    let errno = p["defaultErrnoRet"].as_u64().unwrap_or(libc::EPERM as u64) as u32;
    let mut allowed = Vec::new();
    for rule in p["syscalls"].as_array().ok_or("no syscalls")? {
        if rule["action"] != "SCMP_ACT_ALLOW" || !rule["args"].is_null() {
            return Err(format!(
                "{path}: only argument-free SCMP_ACT_ALLOW rules are understood"
            ));
        }
        for name in rule["names"].as_array().ok_or("no names")? {
            let name = name.as_str().ok_or("a name is not a string")?;
            let sys = format!("SYS_{name}");
            let nr = SYSCALLS
                .iter()
                .find(|(n, _)| *n == sys)
                .ok_or_else(|| format!("{path}: unknown syscall {name:?}"))?
                .1;
            allowed.push(nr as u32);
        }
    }
    Ok((allowed, errno))
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let split = argv.iter().position(|a| a == "--").unwrap_or(argv.len());
    let args: Vec<String> = argv[(split + 1).min(argv.len())..].to_vec();
    let profile_path = argv[1..split]
        .windows(2)
        .find(|w| w[0] == "--profile")
        .map(|w| w[1].clone());
    if args.is_empty() {
        eprintln!("usage: moat-seccomp-exec [--profile FILE] -- CMD [ARGS…]");
        std::process::exit(2);
    }
    let (allowed, errno, allow_by_default) = match &profile_path {
        Some(p) => match profile(p) {
            Ok((a, e)) => (a, e, false),
            Err(e) => {
                eprintln!("moat-seccomp-exec: {e}");
                std::process::exit(2);
            }
        },
        // Only bpf() refused.
        None => (vec![libc::SYS_bpf as u32], libc::EPERM as u32, true),
    };
    let ld = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let (listed, other) = if allow_by_default {
        (SECCOMP_RET_ERRNO | errno, SECCOMP_RET_ALLOW)
    } else {
        (SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | errno)
    };
    let n = allowed.len();
    assert!(n < 250, "one jump table");
    let mut filter = vec![
        stmt(ld, 4),
        // Another architecture (this tool runs x86_64 binaries): as unlisted.
        jump(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, other),
        stmt(ld, 0),
        // x32 calls are never listed.
        jump(libc::BPF_JGE, X32_SYSCALL_BIT, n as u8, 0),
    ];
    for (i, nr) in allowed.iter().enumerate() {
        // Matched: jump over the remaining comparisons and the "other" return.
        filter.push(jump(libc::BPF_JEQ, *nr, (n - i) as u8, 0));
    }
    filter.push(stmt(ret, other));
    filter.push(stmt(ret, listed));
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL in arguments"))
        .collect();
    let mut cargv: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    cargv.push(std::ptr::null());
    // SAFETY: plain syscalls on valid, live buffers; execvp only returns on failure.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            eprintln!("seccomp: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        libc::execvp(cargv[0], cargv.as_ptr());
    }
    eprintln!("exec {}: {}", args[0], std::io::Error::last_os_error());
    std::process::exit(127);
}
