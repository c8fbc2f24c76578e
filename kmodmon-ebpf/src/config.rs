//! The kernel layout userspace resolved at start-up (see `kmodmon_common::Config`).
use kmodmon_common::Config;

/// Filled in by userspace through `EbpfLoader::set_global` before load.
#[unsafe(no_mangle)]
pub static KMODMON_CONFIG: Config = Config::unset();

/// Reads one configuration field. The volatile read keeps the compiler from folding the
/// defaults into the code: the real values are only known at load time.
macro_rules! conf {
    ($($field:tt)+) => {
        // SAFETY: a read-only global, valid for the program's life.
        unsafe { core::ptr::read_volatile(&$crate::config::KMODMON_CONFIG.$($field)+) }
    };
}
pub(crate) use conf;
