//! Small value types of the configuration that are written as strings: a limit that
//! may be `"never"`, a time of day, a size, and a policy's `refresh` mode.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

/// A policy's lifecycle limit: a duration, or `"never"` to lift the source's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `"never"`.
    Never,
    /// A duration such as `"30m"` or `"7d"`.
    After(Duration),
}

impl Limit {
    pub fn duration(self) -> Option<Duration> {
        match self {
            Limit::Never => None,
            Limit::After(d) => Some(d),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text.trim() == "never" {
            return Ok(Limit::Never);
        }
        humantime::parse_duration(text.trim())
            .map(Limit::After)
            .map_err(|e| de::Error::custom(format!("{text:?} is not a duration or \"never\": {e}")))
    }
}

/// `snapshot_at`: a time of day, `"HH:MM"`, always in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    /// Minutes after midnight UTC.
    minutes: u32,
}

const DAY: u64 = 24 * 3600;

impl TimeOfDay {
    pub fn new(hour: u32, minute: u32) -> Option<Self> {
        (hour < 24 && minute < 60).then_some(Self {
            minutes: hour * 60 + minute,
        })
    }

    pub fn hour(self) -> u32 {
        self.minutes / 60
    }

    pub fn minute(self) -> u32 {
        self.minutes % 60
    }

    /// The first moment at or after `now` whose UTC time of day is this one.
    pub fn next_at_or_after(self, now: SystemTime) -> SystemTime {
        let since = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let day_start = since.as_secs() / DAY * DAY;
        let today = Duration::from_secs(day_start + u64::from(self.minutes) * 60);
        let at = if today >= since {
            today
        } else {
            today + Duration::from_secs(DAY)
        };
        SystemTime::UNIX_EPOCH + at
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour(), self.minute())
    }
}

impl std::str::FromStr for TimeOfDay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a time of day \"HH:MM\" (24-hour clock, UTC)");
        let (h, m) = s.split_once(':').ok_or_else(bad)?;
        if h.len() != 2 || m.len() != 2 {
            return Err(bad());
        }
        let h: u32 = h.parse().map_err(|_| bad())?;
        let m: u32 = m.parse().map_err(|_| bad())?;
        Self::new(h, m).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for TimeOfDay {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A size in bytes, written `"10GB"`, `"512MB"` or as a number of bytes. Units are
/// powers of 1024, as in PostgreSQL's own settings (`kB`, `MB`, `GB`, `TB`; `KiB`,
/// `MiB`, `GiB`, `TiB` are accepted too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size, so a configured `"10GB"` reads back
    /// as written.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in UNITS.iter().rev() {
            if *mult > 1 && self.0 >= *mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

const UNITS: [(&str, u64); 5] = [
    ("B", 1),
    ("kB", 1 << 10),
    ("MB", 1 << 20),
    ("GB", 1 << 30),
    ("TB", 1 << 40),
];

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a size such as \"10GB\" or \"512MB\"");
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: u64 = num.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let unit = unit
            .strip_suffix("ib")
            .map_or(unit.clone(), |u| format!("{u}b"));
        let mult = match unit.as_str() {
            "" | "b" => 1,
            _ => UNITS
                .iter()
                .find(|(u, _)| u.eq_ignore_ascii_case(&unit))
                .map(|(_, m)| *m)
                .ok_or_else(bad)?,
        };
        num.checked_mul(mult).map(ByteSize).ok_or_else(bad)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"10GB\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

/// What happens to a branch when its source takes a new snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refresh {
    /// It keeps its data.
    #[default]
    Never,
    /// It is reset to the new snapshot at the first moment it has no session.
    OnSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_powers_of_1024_and_print_back() {
        for (text, bytes) in [
            ("10GB", 10u64 << 30),
            ("10 GiB", 10 << 30),
            ("512MB", 512 << 20),
            ("1tb", 1 << 40),
            ("64kB", 64 << 10),
            ("1000", 1000),
            ("7B", 7),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "GB", "10XB", "-1GB", "1.5GB", "99999999999999TB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        assert_eq!(ByteSize(10 << 30).to_string(), "10GB");
        assert_eq!(ByteSize(1536 << 20).to_string(), "1536MB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn times_of_day_are_utc_and_next_is_never_in_the_past() {
        let t: TimeOfDay = "03:00".parse().unwrap();
        assert_eq!(t.to_string(), "03:00");
        for bad in ["3:00", "24:00", "03:60", "0300", "03:00:00", "aa:bb"] {
            let e = bad.parse::<TimeOfDay>().unwrap_err();
            assert!(e.contains("UTC"), "{e}");
        }
        let midnight = SystemTime::UNIX_EPOCH + Duration::from_secs(10 * DAY);
        let three = midnight + Duration::from_secs(3 * 3600);
        assert_eq!(t.next_at_or_after(midnight), three);
        assert_eq!(t.next_at_or_after(three), three);
        assert_eq!(
            t.next_at_or_after(three + Duration::from_secs(1)),
            three + Duration::from_secs(DAY)
        );
    }
}
