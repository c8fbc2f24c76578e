//! Process limits the daemon sets for itself at start.
//!
//! Many accepted connections, segment rotation, runtime-state reads and `/proc` walks all take
//! file descriptors. The usual soft limit (1024) is easy to exhaust on purpose through the
//! metrics port; the hard limit (often 524288 under systemd) is what root intends to allow.

/// RLIMIT_NOFILE before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. The daemon calls it once, first thing.
/// Never lowers anything; an error only when the limit cannot be read or set.
pub fn raise_nofile_limit() -> Result<NofileLimit, nix::errno::Errno> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    let (now, hard_now) = getrlimit(Resource::RLIMIT_NOFILE)?;
    Ok(NofileLimit {
        soft_before: soft,
        soft: now,
        hard: hard_now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_becomes_the_hard_limit() {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        // Lower the soft limit (always allowed), then raise it back.
        let low = soft.min(hard).min(256);
        setrlimit(Resource::RLIMIT_NOFILE, low, hard).unwrap();
        let l = raise_nofile_limit().unwrap();
        assert_eq!(l.soft_before, low);
        assert_eq!(l.soft, hard);
        assert_eq!(l.hard, hard);
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (hard, hard));
        let again = raise_nofile_limit().unwrap();
        assert_eq!((again.soft_before, again.soft), (hard, hard), "idempotent");
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    }
}
