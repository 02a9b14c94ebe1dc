// SPDX-License-Identifier: Apache-2.0
//! Kubernetes resource quantities: parsing (for annotation validation) and the canonical form the
//! API server writes back (`2000m` → `2`, `1024Mi` → `1Gi`), which is what Istio's injected pods
//! contain because they pass through Go's `resource.Quantity`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    DecimalSi,
    BinarySi,
    DecimalExponent,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)]
pub struct QuantityError;

/// Parses a quantity into (value as a rational number of 10^-9 units, format).
fn parse(s: &str) -> Result<(i128, Format), QuantityError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(QuantityError);
    }
    let num_len = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || ((*c == '+' || *c == '-') && *i == 0)))
        .map(|(i, _)| i)
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(num_len);
    if num.is_empty() || num == "+" || num == "-" || num.matches('.').count() > 1 {
        return Err(QuantityError);
    }
    let neg = num.starts_with('-');
    let digits = num.trim_start_matches(['+', '-']);
    let (int_part, frac_part) = digits.split_once('.').unwrap_or((digits, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(QuantityError);
    }
    // Value in nano-units as i128 (fraction beyond 9 digits is rounded up like Go's Quantity).
    let mut nanos: i128 = 0;
    for c in int_part.chars() {
        nanos = nanos.checked_mul(10).ok_or(QuantityError)? + i128::from(c as u8 - b'0');
    }
    nanos = nanos.checked_mul(1_000_000_000).ok_or(QuantityError)?;
    let mut scale: i128 = 100_000_000;
    let mut round_up = false;
    for c in frac_part.chars() {
        let d = i128::from(c as u8 - b'0');
        if scale == 0 {
            if d != 0 {
                round_up = true;
            }
            continue;
        }
        nanos += d * scale;
        scale /= 10;
    }
    if round_up {
        nanos += 1;
    }
    let (mult_num, mult_den, format): (i128, i128, Format) = match suffix {
        "" => (1, 1, Format::DecimalSi),
        "n" => (1, 1_000_000_000, Format::DecimalSi),
        "u" => (1, 1_000_000, Format::DecimalSi),
        "m" => (1, 1000, Format::DecimalSi),
        "k" => (1000, 1, Format::DecimalSi),
        "M" => (1_000_000, 1, Format::DecimalSi),
        "G" => (1_000_000_000, 1, Format::DecimalSi),
        "T" => (1_000_000_000_000, 1, Format::DecimalSi),
        "P" => (1_000_000_000_000_000, 1, Format::DecimalSi),
        "E" => (1_000_000_000_000_000_000, 1, Format::DecimalSi),
        "Ki" => (1 << 10, 1, Format::BinarySi),
        "Mi" => (1 << 20, 1, Format::BinarySi),
        "Gi" => (1 << 30, 1, Format::BinarySi),
        "Ti" => (1 << 40, 1, Format::BinarySi),
        "Pi" => (1 << 50, 1, Format::BinarySi),
        "Ei" => (1 << 60, 1, Format::BinarySi),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| QuantityError)?;
            if !(-9..=18).contains(&exp) {
                return Err(QuantityError);
            }
            if exp >= 0 {
                (10i128.pow(exp.unsigned_abs()), 1, Format::DecimalExponent)
            } else {
                (1, 10i128.pow(exp.unsigned_abs()), Format::DecimalExponent)
            }
        }
        _ => return Err(QuantityError),
    };
    let v = nanos.checked_mul(mult_num).ok_or(QuantityError)?;
    // Round up to the nano unit like Go.
    let v = if v % mult_den == 0 {
        v / mult_den
    } else {
        v / mult_den + 1
    };
    Ok((if neg { -v } else { v }, format))
}

pub fn validate(s: &str) -> Result<(), QuantityError> {
    parse(s).map(|_| ())
}

/// The canonical string for a quantity, or `None` when it does not parse.
pub fn canonical(s: &str) -> Option<String> {
    let (nanos, format) = parse(s).ok()?;
    if nanos == 0 {
        return Some("0".into());
    }
    let neg = nanos < 0;
    let n = nanos.abs();
    let sign = if neg { "-" } else { "" };
    if format == Format::BinarySi && n % 1_000_000_000 == 0 {
        let whole = n / 1_000_000_000;
        // Go uses binary suffixes only for values >= 1024 that are exact multiples; else decimal.
        if whole >= 1024 {
            let mut v = whole;
            let mut i = 0;
            while v % 1024 == 0 && i < 6 {
                v /= 1024;
                i += 1;
            }
            let suf = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i];
            return Some(format!("{sign}{v}{suf}"));
        }
    }
    // Decimal: choose the largest SI suffix (exponent multiple of 3) that keeps an integer.
    let mut exp: i32 = -9;
    let mut v = n;
    while v % 1000 == 0 && exp < 18 {
        v /= 1000;
        exp += 3;
    }
    let suffix = match (format, exp) {
        (Format::DecimalExponent, 0) => String::new(),
        (Format::DecimalExponent, e) => format!("e{e}"),
        (_, -9) => "n".into(),
        (_, -6) => "u".into(),
        (_, -3) => "m".into(),
        (_, 0) => String::new(),
        (_, 3) => "k".into(),
        (_, 6) => "M".into(),
        (_, 9) => "G".into(),
        (_, 12) => "T".into(),
        (_, 15) => "P".into(),
        (_, _) => "E".into(),
    };
    Some(format!("{sign}{v}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_match_go() {
        assert_eq!(canonical("2000m").as_deref(), Some("2"));
        assert_eq!(canonical("1024Mi").as_deref(), Some("1Gi"));
        assert_eq!(canonical("100m").as_deref(), Some("100m"));
        assert_eq!(canonical("128Mi").as_deref(), Some("128Mi"));
        assert_eq!(canonical("4000m").as_deref(), Some("4"));
        assert_eq!(canonical("0").as_deref(), Some("0"));
        assert_eq!(canonical("1.5").as_deref(), Some("1500m"));
        assert_eq!(canonical("1k").as_deref(), Some("1k"));
        assert!(canonical("bogus").is_none());
        assert!(validate("100mi").is_err());
    }
}
