//! Spend and token budgets per client key, per calendar day and month (UTC):
//! which budgets a request counts in, what it may spend, and the calendar.
//! Where the amounts are kept (ext-proc, in SQLite or Redis) is elsewhere;
//! this is the arithmetic both the filter and ext-proc share.
//!
//! A budget is a fixed window, not a refilling bucket: what is spent in a
//! day stays spent until the day ends, then the next day starts from
//! nothing. A request is admitted by reserving the most it may cost; its
//! record settles the reservation with what it really cost.

use crate::config::{BudgetAmounts, KeyBudgetsConfig, Price};
use crate::routing::Pattern;
use serde::{Deserialize, Serialize};

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetUnit {
    /// US dollars, counted in millionths.
    Usd,
    /// Prompt and completion tokens together.
    Tokens,
}

/// The calendar window a budget is counted over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
}

/// One budget of one key, as the filter sends it to be admitted in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetLimit {
    /// `key`, `model:<pattern>` or `backend:<name>`: from configuration, never client input.
    pub scope: String,
    pub unit: BudgetUnit,
    pub period: Period,
    /// The amount: millionths of a dollar, or tokens.
    pub limit: u64,
}

impl BudgetLimit {
    /// As the configuration and the refusal name it: `usd_per_day`, `tokens_per_month`.
    pub fn amount_name(&self) -> &'static str {
        match (self.unit, self.period) {
            (BudgetUnit::Usd, Period::Day) => "usd_per_day",
            (BudgetUnit::Usd, Period::Month) => "usd_per_month",
            (BudgetUnit::Tokens, Period::Day) => "tokens_per_day",
            (BudgetUnit::Tokens, Period::Month) => "tokens_per_month",
        }
    }

    /// Its counter's name for `owner` in the period that holds `now_secs`:
    /// each period has its own counter, so a new period starts from nothing.
    pub fn counter(&self, owner: &str, now_secs: u64) -> String {
        format!("{owner}|{}|{}|{}", self.scope, self.amount_name(), period_id(self.period, now_secs))
    }

    /// As a refusal's message names it: ``usd_per_day of key `alice` on models `gpt-4*` ``.
    pub fn describe(&self, owner: &str) -> String {
        let on = match self.scope.split_once(':') {
            Some(("model", pattern)) => format!(" on models `{pattern}`"),
            Some(("backend", backend)) => format!(" on backend `{backend}`"),
            _ => String::new(),
        };
        format!("{} of key `{owner}`{on}", self.amount_name())
    }
}

/// Every budget of a key's that a request for `model` served by `backend` counts in:
/// the key's own, the most specific model pattern's for each amount, and the backend's.
pub fn applicable(config: &KeyBudgetsConfig, model: &str, backend: &str) -> Vec<BudgetLimit> {
    let mut limits = Vec::new();
    push_amounts(&mut limits, "key".to_string(), &config.own());
    // Each pattern parsed once, whatever the number of amounts it sets.
    let matching: Vec<_> = config
        .models
        .iter()
        .filter_map(|(pattern, amounts)| {
            let parsed = Pattern::parse(pattern).ok()?;
            parsed.matches(model).then(|| (parsed.specificity(), pattern, amounts))
        })
        .collect();
    for (unit, period) in AMOUNTS {
        let most_specific = matching
            .iter()
            .filter_map(|&(specificity, pattern, amounts)| Some((specificity, pattern, amount(amounts, unit, period)?)))
            .max_by_key(|(specificity, _, _)| *specificity);
        if let Some((_, pattern, limit)) = most_specific {
            limits.push(BudgetLimit { scope: format!("model:{pattern}"), unit, period, limit });
        }
    }
    if let Some(amounts) = config.backends.get(backend) {
        push_amounts(&mut limits, format!("backend:{backend}"), amounts);
    }
    limits
}

const AMOUNTS: [(BudgetUnit, Period); 4] = [
    (BudgetUnit::Usd, Period::Day),
    (BudgetUnit::Usd, Period::Month),
    (BudgetUnit::Tokens, Period::Day),
    (BudgetUnit::Tokens, Period::Month),
];

fn push_amounts(limits: &mut Vec<BudgetLimit>, scope: String, amounts: &BudgetAmounts) {
    for (unit, period) in AMOUNTS {
        if let Some(limit) = amount(amounts, unit, period) {
            limits.push(BudgetLimit { scope: scope.clone(), unit, period, limit });
        }
    }
}

/// One configured amount, in the budget's unit (dollars become millionths).
fn amount(amounts: &BudgetAmounts, unit: BudgetUnit, period: Period) -> Option<u64> {
    match (unit, period) {
        (BudgetUnit::Usd, Period::Day) => amounts.usd_per_day.map(usd_micros),
        (BudgetUnit::Usd, Period::Month) => amounts.usd_per_month.map(usd_micros),
        (BudgetUnit::Tokens, Period::Day) => amounts.tokens_per_day,
        (BudgetUnit::Tokens, Period::Month) => amounts.tokens_per_month,
    }
}

/// Dollars in millionths, rounded up (a cost is never under-counted); negative is 0.
pub fn usd_micros(usd: f64) -> u64 {
    let micros = (usd * 1e6).ceil();
    if micros.is_finite() && micros > 0.0 {
        micros as u64
    } else {
        0
    }
}

/// What `prompt` and `completion` tokens cost at `price`, in millionths of a dollar; 0 without a price.
pub fn cost_micros(price: Option<&Price>, prompt: u64, completion: u64) -> u64 {
    price.map_or(0, |price| {
        usd_micros((prompt as f64 * price.input_per_million + completion as f64 * price.output_per_million) / 1e6)
    })
}

/// The period holding `now_secs`, as its counter names it: `2026-12-02` or `2026-12`.
pub fn period_id(period: Period, now_secs: u64) -> String {
    let (year, month, day) = civil_date(now_secs / DAY_SECS);
    match period {
        Period::Day => format!("{year:04}-{month:02}-{day:02}"),
        Period::Month => format!("{year:04}-{month:02}"),
    }
}

/// When the period holding `now_secs` ends (and the next starts), in seconds since the epoch.
pub fn resets_at(period: Period, now_secs: u64) -> u64 {
    let days = now_secs / DAY_SECS;
    match period {
        Period::Day => (days + 1) * DAY_SECS,
        Period::Month => {
            let (year, month, _) = civil_date(days);
            let (year, month) = if month == 12 { (year + 1, 1) } else { (year, month + 1) };
            days_from_civil(year, month, 1) * DAY_SECS
        }
    }
}

/// A moment as RFC 3339 in UTC, to the second: `2027-01-01T00:00:00Z`.
pub fn rfc3339(secs: u64) -> String {
    let (year, month, day) = civil_date(secs / DAY_SECS);
    let in_day = secs % DAY_SECS;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", in_day / 3600, in_day / 60 % 60, in_day % 60)
}

const DAY_SECS: u64 = 86_400;

/// Year, month and day of the `days`th day since 1970-01-01 (Howard Hinnant's civil calendar).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a date from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let yoe = year - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A period is every second up to its reset, and the reset starts the next one.
        #[test]
        fn a_period_ends_where_the_next_begins(now in 0u64..1 << 40, month in any::<bool>()) {
            let period = if month { Period::Month } else { Period::Day };
            let reset = resets_at(period, now);
            prop_assert!(reset > now);
            prop_assert_eq!(period_id(period, reset - 1), period_id(period, now));
            prop_assert_ne!(period_id(period, reset), period_id(period, now));
            // Periods start at midnight; a month on its first day.
            prop_assert_eq!(reset % DAY_SECS, 0);
            let longest = if month { 31 * DAY_SECS } else { DAY_SECS };
            prop_assert!(reset - now <= longest);
            if month {
                prop_assert!(period_id(Period::Day, reset).ends_with("-01"));
            }
        }
    }

    #[test]
    fn a_request_counts_in_the_keys_budgets_its_most_specific_patterns_and_its_backends() {
        let config: KeyBudgetsConfig = serde_json::from_value(serde_json::json!({
            "usd_per_day": 5.0, "tokens_per_month": 1000,
            "models": {"*": {"usd_per_day": 3}, "gpt-4*": {"usd_per_day": 1, "tokens_per_day": 50},
                       "gpt-4o": {"usd_per_day": 0.5}},
            "backends": {"openai": {"usd_per_month": 20}}
        }))
        .unwrap();
        let named = |model, backend| -> Vec<(String, &str, u64)> {
            applicable(&config, model, backend).iter().map(|b| (b.scope.clone(), b.amount_name(), b.limit)).collect()
        };
        let own = [("key".to_string(), "usd_per_day", 5_000_000), ("key".to_string(), "tokens_per_month", 1000)];
        let mut expected = own.to_vec();
        expected.extend([
            ("model:gpt-4o".to_string(), "usd_per_day", 500_000),
            ("model:gpt-4*".to_string(), "tokens_per_day", 50),
            ("backend:openai".to_string(), "usd_per_month", 20_000_000),
        ]);
        assert_eq!(named("gpt-4o", "openai"), expected);
        let mut expected = own.to_vec();
        expected.push(("model:*".to_string(), "usd_per_day", 3_000_000));
        assert_eq!(named("llama", "vllm"), expected);
        assert!(applicable(&KeyBudgetsConfig::default(), "m", "b").is_empty());
    }

    #[test]
    fn periods_follow_the_utc_calendar() {
        // 2026-12-31T23:59:59Z, then the next second.
        let last = 1_798_761_599;
        assert_eq!(period_id(Period::Day, last), "2026-12-31");
        assert_eq!(period_id(Period::Month, last), "2026-12");
        assert_eq!(resets_at(Period::Day, last), last + 1);
        assert_eq!(resets_at(Period::Month, last), last + 1);
        assert_eq!(period_id(Period::Day, last + 1), "2027-01-01");
        // A leap day.
        assert_eq!(period_id(Period::Day, 1_709_164_800), "2024-02-29");
        assert_eq!(resets_at(Period::Month, 1_709_164_800), 1_709_251_200);
        assert_eq!(rfc3339(last), "2026-12-31T23:59:59Z");
    }
}
