//! Error numbers: their names for the report, and which of them a kernel
//! must never hand to userspace.
//!
//! Linux defines 1..=133 for userspace (include/uapi/asm-generic/errno-base.h
//! and errno.h, up to EHWPOISON). Numbers from 512 up are the kernel's own
//! (include/linux/errno.h): the syscall exit path turns the ERESTART* ones
//! into a restart or EINTR only when a signal is pending, so a driver that
//! returns one otherwise leaks it to userspace as is.
//!
//! Context: pure logic, any thread.

/// `ERESTARTSYS`, include/linux/errno.h.
pub const ERESTARTSYS: i32 = 512;
/// `ERESTARTNOINTR`
pub const ERESTARTNOINTR: i32 = 513;
/// `ERESTARTNOHAND`
pub const ERESTARTNOHAND: i32 = 514;
/// `ENOIOCTLCMD`: "no ioctl command", which the VFS turns into ENOTTY
/// only for some callers.
pub const ENOIOCTLCMD: i32 = 515;
/// `ERESTART_RESTARTBLOCK`
pub const ERESTART_RESTARTBLOCK: i32 = 516;
/// The largest errno userspace may see (`EHWPOISON`).
pub const LAST_USER_ERRNO: i32 = libc::EHWPOISON;

macro_rules! errno_names {
    ($($name:ident),* $(,)?) => {
        /// Every userspace errno of Linux with its name (EWOULDBLOCK and
        /// EDEADLOCK are aliases and absent).
        const NAMES: &[(i32, &str)] = &[$((libc::$name, stringify!($name))),*];
    };
}

errno_names!(
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    ENOEXEC,
    EBADF,
    ECHILD,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    ENOTBLK,
    EBUSY,
    EEXIST,
    EXDEV,
    ENODEV,
    ENOTDIR,
    EISDIR,
    EINVAL,
    ENFILE,
    EMFILE,
    ENOTTY,
    ETXTBSY,
    EFBIG,
    ENOSPC,
    ESPIPE,
    EROFS,
    EMLINK,
    EPIPE,
    EDOM,
    ERANGE,
    EDEADLK,
    ENAMETOOLONG,
    ENOLCK,
    ENOSYS,
    ENOTEMPTY,
    ELOOP,
    ENOMSG,
    EIDRM,
    ECHRNG,
    EL2NSYNC,
    EL3HLT,
    EL3RST,
    ELNRNG,
    EUNATCH,
    ENOCSI,
    EL2HLT,
    EBADE,
    EBADR,
    EXFULL,
    ENOANO,
    EBADRQC,
    EBADSLT,
    EBFONT,
    ENOSTR,
    ENODATA,
    ETIME,
    ENOSR,
    ENONET,
    ENOPKG,
    EREMOTE,
    ENOLINK,
    EADV,
    ESRMNT,
    ECOMM,
    EPROTO,
    EMULTIHOP,
    EDOTDOT,
    EBADMSG,
    EOVERFLOW,
    ENOTUNIQ,
    EBADFD,
    EREMCHG,
    ELIBACC,
    ELIBBAD,
    ELIBSCN,
    ELIBMAX,
    ELIBEXEC,
    EILSEQ,
    ERESTART,
    ESTRPIPE,
    EUSERS,
    ENOTSOCK,
    EDESTADDRREQ,
    EMSGSIZE,
    EPROTOTYPE,
    ENOPROTOOPT,
    EPROTONOSUPPORT,
    ESOCKTNOSUPPORT,
    EOPNOTSUPP,
    EPFNOSUPPORT,
    EAFNOSUPPORT,
    EADDRINUSE,
    EADDRNOTAVAIL,
    ENETDOWN,
    ENETUNREACH,
    ENETRESET,
    ECONNABORTED,
    ECONNRESET,
    ENOBUFS,
    EISCONN,
    ENOTCONN,
    ESHUTDOWN,
    ETOOMANYREFS,
    ETIMEDOUT,
    ECONNREFUSED,
    EHOSTDOWN,
    EHOSTUNREACH,
    EALREADY,
    EINPROGRESS,
    ESTALE,
    EUCLEAN,
    ENOTNAM,
    ENAVAIL,
    EISNAM,
    EREMOTEIO,
    EDQUOT,
    ENOMEDIUM,
    EMEDIUMTYPE,
    ECANCELED,
    ENOKEY,
    EKEYEXPIRED,
    EKEYREVOKED,
    EKEYREJECTED,
    EOWNERDEAD,
    ENOTRECOVERABLE,
    ERFKILL,
    EHWPOISON,
);

/// The kernel-internal numbers by name.
const KERNEL_NAMES: &[(i32, &str)] = &[
    (ERESTARTSYS, "ERESTARTSYS"),
    (ERESTARTNOINTR, "ERESTARTNOINTR"),
    (ERESTARTNOHAND, "ERESTARTNOHAND"),
    (ENOIOCTLCMD, "ENOIOCTLCMD"),
    (ERESTART_RESTARTBLOCK, "ERESTART_RESTARTBLOCK"),
];

/// The name of `errno` ("EINVAL"), or "errno N" for a number without one.
pub fn name(errno: i32) -> String {
    NAMES
        .iter()
        .chain(KERNEL_NAMES)
        .find(|(n, _)| *n == errno)
        .map_or_else(|| format!("errno {errno}"), |(_, s)| (*s).to_string())
}

/// Why a failed call's `errno` must never reach userspace, if it must not.
pub fn forbidden(errno: i32) -> Option<&'static str> {
    if KERNEL_NAMES.iter().any(|(n, _)| *n == errno) {
        Some("a kernel-internal restart or ioctl code, which must never reach userspace")
    } else if errno <= 0 {
        Some("a failure (-1) with no error number")
    } else if errno > LAST_USER_ERRNO {
        Some("beyond every errno Linux defines for userspace")
    } else {
        None
    }
}

/// Why a call's raw result `ret` (with `errno` read after it) breaks the
/// syscall convention, if it does: a result below -1 is a kernel error
/// number outside -4095..-1 that glibc did not recognise as one.
pub fn bad_result(ret: i64, errno: i32) -> Option<String> {
    if ret < -1 {
        return Some(format!("returned {ret}, a negative value other than -1"));
    }
    if ret == -1 {
        return forbidden(errno).map(|why| format!("failed with {} ({errno}): {why}", name(errno)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_libc() {
        assert_eq!(name(libc::EINVAL), "EINVAL");
        assert_eq!(name(libc::ENOTTY), "ENOTTY");
        assert_eq!(name(133), "EHWPOISON");
        assert_eq!(name(ERESTARTSYS), "ERESTARTSYS");
        assert_eq!(name(600), "errno 600");
    }

    #[test]
    fn every_userspace_errno_is_named_once() {
        for e in 1..=LAST_USER_ERRNO {
            // 41 and 58 are unused (EWOULDBLOCK and EDEADLOCK alias others).
            if e == 41 || e == 58 {
                continue;
            }
            assert_eq!(
                NAMES.iter().filter(|(n, _)| *n == e).count(),
                1,
                "errno {e}"
            );
        }
    }

    #[test]
    fn kernel_internal_and_out_of_range_errnos_are_forbidden() {
        for e in [512, 513, 514, 515, 516, 134, 600, 4095, 0, -3] {
            assert!(forbidden(e).is_some(), "{e}");
        }
        for e in [
            libc::EINVAL,
            libc::EFAULT,
            libc::EINTR,
            libc::EIO,
            libc::E2BIG,
            133,
            1,
        ] {
            assert!(forbidden(e).is_none(), "{e}");
        }
    }

    #[test]
    fn results_below_minus_one_are_bad() {
        assert!(bad_result(-2, 0).is_some());
        assert!(bad_result(-5000, 0).is_some());
        assert!(bad_result(-1, libc::EINVAL).is_none());
        assert!(bad_result(-1, ERESTARTSYS).is_some_and(|s| s.contains("ERESTARTSYS")));
        assert!(bad_result(0, 0).is_none());
        assert!(bad_result(7, 0).is_none());
    }
}
