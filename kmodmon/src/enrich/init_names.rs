//! init_module carries no module name the kernel side can read (the image is in user memory
//! and the name is inside its ELF sections). When the load succeeds, the kernel's own
//! module_load record — emitted by the same task during the same syscall, so just before the
//! attempt's record — names it. This joins the two.
use std::collections::HashMap;

use crate::event::{Event, Kind, Syscall};

/// How long a load record waits for its attempt (the same syscall: microseconds to seconds).
const WINDOW_NS: u64 = 30_000_000_000;
/// Most loads remembered; older ones are dropped first.
const CAPACITY: usize = 1024;

#[derive(Debug, Default)]
pub struct InitNames {
    /// tid → (module, ktime of the load record)
    recent: HashMap<u32, (String, u64)>,
}

impl InitNames {
    /// Notes load records and names successful init_module attempts that lack a name.
    pub fn observe(&mut self, ev: &mut Event) {
        match ev.kind {
            Kind::Load => {
                if let Some(m) = &ev.module {
                    if self.recent.len() >= CAPACITY {
                        let now = ev.ktime_ns;
                        self.recent
                            .retain(|_, (_, t)| now.saturating_sub(*t) < WINDOW_NS);
                        if self.recent.len() >= CAPACITY {
                            self.recent.clear();
                        }
                    }
                    self.recent.insert(ev.tid, (m.clone(), ev.ktime_ns));
                }
            }
            Kind::LoadAttempt
                if ev.syscall == Some(Syscall::InitModule)
                    && ev.module.is_none()
                    && ev.result == Some(0) =>
            {
                if let Some((m, t)) = self.recent.remove(&ev.tid)
                    && ev.ktime_ns.abs_diff(t) < WINDOW_NS
                {
                    ev.module = Some(m);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Clock;

    fn ev(kind: Kind, tid: u32, module: Option<&str>, t: u64) -> Event {
        let mut e = Event::synthetic(kind, &Clock::new());
        e.tid = tid;
        e.module = module.map(String::from);
        e.ktime_ns = t;
        if kind == Kind::LoadAttempt {
            e.syscall = Some(Syscall::InitModule);
            e.result = Some(0);
        }
        e
    }

    #[test]
    fn a_successful_init_module_gets_the_name_its_load_record_gave() {
        let mut n = InitNames::default();
        n.observe(&mut ev(Kind::Load, 7, Some("ip_vs"), 100));
        n.observe(&mut ev(Kind::Load, 8, Some("other"), 110));
        let mut a = ev(Kind::LoadAttempt, 7, None, 200);
        n.observe(&mut a);
        assert_eq!(a.module.as_deref(), Some("ip_vs"));
        // Used once.
        let mut again = ev(Kind::LoadAttempt, 7, None, 300);
        n.observe(&mut again);
        assert_eq!(again.module, None);
    }

    #[test]
    fn failures_and_other_tasks_stay_unnamed() {
        let mut n = InitNames::default();
        n.observe(&mut ev(Kind::Load, 7, Some("ip_vs"), 100));
        let mut failed = ev(Kind::LoadAttempt, 7, None, 200);
        failed.result = Some(-17);
        n.observe(&mut failed);
        assert_eq!(failed.module, None);
        let mut other = ev(Kind::LoadAttempt, 9, None, 200);
        n.observe(&mut other);
        assert_eq!(other.module, None);
        let mut late = ev(Kind::LoadAttempt, 7, None, 100 + WINDOW_NS + 1);
        n.observe(&mut late);
        assert_eq!(late.module, None, "outside the window");
    }
}
