//! Time limits per task type: a default for all, and overrides such as
//! `TAREAS_TASK_TIME_LIMITS=compute=900,sleep=70`.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

/// The time limit of each task type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeLimits {
    /// For every type without an override.
    pub default: Duration,
    /// task_type → its own limit.
    pub overrides: HashMap<String, Duration>,
}

impl TimeLimits {
    pub fn for_type(&self, task_type: &str) -> Duration {
        self.overrides
            .get(task_type)
            .copied()
            .unwrap_or(self.default)
    }

    /// The largest limit of any type.
    pub fn longest(&self) -> Duration {
        self.overrides
            .values()
            .copied()
            .fold(self.default, Duration::max)
    }
}

/// One `type=seconds` override, as the flag takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub task_type: String,
    pub limit: Duration,
}

impl FromStr for Override {
    type Err = String;
    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (task_type, secs) = raw
            .split_once('=')
            .ok_or_else(|| format!("expected task_type=seconds, got {raw:?}"))?;
        let secs: u64 = secs.trim().parse().map_err(|_| {
            format!("the limit of {task_type:?} must be whole seconds, got {secs:?}")
        })?;
        Ok(Override {
            task_type: task_type.trim().to_owned(),
            limit: Duration::from_secs(secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_win_over_the_default() {
        let compute: Override = "compute=900".parse().unwrap();
        let limits = TimeLimits {
            default: Duration::from_secs(300),
            overrides: HashMap::from([(compute.task_type, compute.limit)]),
        };
        assert_eq!(limits.for_type("compute"), Duration::from_secs(900));
        assert_eq!(limits.for_type("hash"), Duration::from_secs(300));
        assert_eq!(limits.longest(), Duration::from_secs(900));
        assert!("compute".parse::<Override>().is_err());
        assert!("compute=ten".parse::<Override>().is_err());
    }
}
