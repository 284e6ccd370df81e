//! What the device must never do, as the fuzzer found it: each distinct
//! violation once, with how often it happened and the first example
//! (seed, phase, step, operation) to reproduce it from.
//!
//! Context: shared by every thread behind one mutex (findings are rare);
//! the number of distinct findings is mirrored in `progress` for the
//! emergency report.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::progress;

/// Distinct findings kept in full; past this, new kinds are only counted,
/// so that a device that fails in a thousand ways still gets a readable
/// report.
const MAX_KINDS: usize = 200;

/// One violation and its occurrences.
#[derive(Clone, Debug)]
pub struct Finding {
    /// The rule that was broken, without the values that broke it.
    pub what: String,
    /// How many times.
    pub count: u64,
    /// The first occurrence: where, and the values.
    pub first: String,
}

/// Every finding so far, in the order first seen.
#[derive(Default)]
pub struct Findings {
    list: Vec<Finding>,
    index: BTreeMap<String, usize>,
    /// Occurrences of kinds beyond [`MAX_KINDS`].
    overflow: u64,
}

impl Findings {
    /// Records one occurrence of `what`; `example` is asked for only the
    /// first time.
    pub fn record(&mut self, what: &str, example: impl FnOnce() -> String) {
        if let Some(&i) = self.index.get(what) {
            self.list[i].count += 1;
            return;
        }
        if self.list.len() >= MAX_KINDS {
            self.overflow += 1;
            return;
        }
        self.index.insert(what.to_string(), self.list.len());
        self.list.push(Finding {
            what: what.to_string(),
            count: 1,
            first: example(),
        });
        progress::found(self.list.len() as u64);
    }

    /// The findings, in the order first seen.
    #[cfg(test)]
    pub fn list(&self) -> &[Finding] {
        &self.list
    }

    /// How many distinct findings (the overflow counting as one more).
    pub fn distinct(&self) -> usize {
        self.list.len() + usize::from(self.overflow > 0)
    }

    /// The report's findings section.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if self.list.is_empty() {
            out.push_str("findings: none\n");
            return out;
        }
        out.push_str(&format!("findings: {}\n", self.distinct()));
        for f in &self.list {
            out.push_str(&format!(
                "  FINDING ({}x) {}\n      first: {}\n",
                f.count, f.what, f.first
            ));
        }
        if self.overflow > 0 {
            out.push_str(&format!(
                "  FINDING ({}x) further kinds not kept (more than {MAX_KINDS})\n",
                self.overflow
            ));
        }
        out
    }
}

/// The store shared by all threads.
pub type SharedFindings = Mutex<Findings>;

/// Records into `shared`, whatever another thread's panic left in it.
pub fn record(shared: &SharedFindings, what: &str, example: impl FnOnce() -> String) {
    let mut f = shared.lock().unwrap_or_else(|e| e.into_inner());
    f.record(what, example);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kind_is_kept_once_with_its_first_example() {
        let mut f = Findings::default();
        f.record("rule A", || "first".into());
        f.record("rule B", || "b".into());
        f.record("rule A", || {
            panic!("the example of a known kind is not built")
        });
        assert_eq!(f.distinct(), 2);
        assert_eq!(f.list()[0].count, 2);
        assert_eq!(f.list()[0].first, "first");
        assert!(f
            .render()
            .contains("FINDING (2x) rule A\n      first: first"));
    }

    #[test]
    fn no_findings_render_as_none() {
        assert_eq!(Findings::default().render(), "findings: none\n");
        assert_eq!(Findings::default().distinct(), 0);
    }

    #[test]
    fn kinds_beyond_the_cap_are_counted_not_kept() {
        let mut f = Findings::default();
        for i in 0..MAX_KINDS + 5 {
            f.record(&format!("rule {i}"), String::new);
        }
        assert_eq!(f.list().len(), MAX_KINDS);
        assert_eq!(f.distinct(), MAX_KINDS + 1);
        assert!(f.render().contains("further kinds"));
    }
}
