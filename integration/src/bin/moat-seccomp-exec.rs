//! `moat-seccomp-exec -- CMD [ARGS…]`: runs CMD under a seccomp filter that makes `bpf(2)`
//! fail with EPERM, as a locked-down container runtime profile does (tests only).

use std::ffi::CString;

// seccomp_data: nr at 0, arch at 4.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SYS_BPF_X86_64: u32 = 321;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jeq(k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip_while(|a| a != "--").skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: moat-seccomp-exec -- CMD [ARGS…]");
        std::process::exit(2);
    }
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut filter = [
        stmt(ld, 4),
        // Another architecture: not ours to judge.
        jeq(AUDIT_ARCH_X86_64, 0, 3),
        stmt(ld, 0),
        jeq(SYS_BPF_X86_64, 0, 1),
        stmt(ret, SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()).expect("no NUL in arguments"))
        .collect();
    let mut argv: Vec<*const libc::c_char> = cargs.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
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
        libc::execvp(argv[0], argv.as_ptr());
    }
    eprintln!("exec {}: {}", args[0], std::io::Error::last_os_error());
    std::process::exit(127);
}
