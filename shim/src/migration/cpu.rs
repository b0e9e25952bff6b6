//! CPU features: a restored workload goes on with the code paths it chose at
//! start (glibc, OpenSSL, a JIT pick AVX2 or AVX-512 once), so a destination
//! whose CPU lacks one of them would crash it with SIGILL. The source sends
//! the features of its CPU that user space can use; the destination refuses,
//! before anything is frozen, when it lacks any of them.

use std::collections::BTreeSet;

/// Instruction-set flags of x86 /proc/cpuinfo that programs may pick at run
/// time (by name, or by prefix for `avx*`, `amx*`, `sse*`); other flags
/// (power management, virtualisation, bugs) do not change what runs.
const X86_PREFIXES: [&str; 3] = ["avx", "amx", "sse"];
const X86_FLAGS: [&str; 38] = [
    "mmx",
    "cx8",
    "cmov",
    "fxsr",
    "pni",
    "ssse3",
    "cx16",
    "popcnt",
    "aes",
    "pclmulqdq",
    "vaes",
    "vpclmulqdq",
    "gfni",
    "sha_ni",
    "fma",
    "fma4",
    "f16c",
    "bmi1",
    "bmi2",
    "adx",
    "abm",
    "lzcnt",
    "movbe",
    "rdrand",
    "rdseed",
    "xsave",
    "xsavec",
    "xsaveopt",
    "clflushopt",
    "clwb",
    "erms",
    "fsrm",
    "rdpid",
    "movdiri",
    "movdir64b",
    "serialize",
    "lm",
    "rtm",
];

/// The user-space CPU features in the text of /proc/cpuinfo: on x86 the
/// instruction-set flags of the first `flags` line, elsewhere (arm64:
/// `Features`) every feature listed, as each is visible to programs.
pub fn parse(cpuinfo: &str) -> BTreeSet<String> {
    for line in cpuinfo.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key.trim() {
            "flags" => {
                return value
                    .split_whitespace()
                    .filter(|f| X86_FLAGS.contains(f) || X86_PREFIXES.iter().any(|p| f.starts_with(p)))
                    .map(String::from)
                    .collect()
            }
            "Features" => return value.split_whitespace().map(String::from).collect(),
            _ => {}
        }
    }
    BTreeSet::new()
}

/// This machine's features, less those in `hide` (`Config::cpu_hide`, a
/// test knob that makes a destination look older than it is).
pub fn local(hide: &[String]) -> BTreeSet<String> {
    let mut f = parse(&std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default());
    for h in hide {
        f.remove(h.trim());
    }
    f
}

/// The source's features this CPU lacks; `None` when the source sent none
/// (an older ums) or this side knows none, so nothing can be compared.
pub fn missing(source: &[String], here: &BTreeSet<String>) -> Option<Vec<String>> {
    if source.is_empty() || here.is_empty() {
        return None;
    }
    let m: Vec<String> = source.iter().filter(|f| !here.contains(*f)).cloned().collect();
    (!m.is_empty()).then_some(m)
}

/// The destination's refusal, naming what is missing.
pub fn refusal(missing: &[String]) -> String {
    format!(
        "this destination's CPU lacks features the source's CPU has, which the workload may use (it would \
         crash with SIGILL here): {}",
        missing.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x86_flags_keep_the_instruction_sets() {
        let info = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr sse sse2 ssse3 sse4_1 sse4_2 avx avx2 \
                    avx512f avx512bw hypervisor constant_tsc aes bmi2 arch_perfmon\nbugs\t\t: spectre_v1\n\
                    processor\t: 1\nflags\t\t: fpu sse\n";
        let f = parse(info);
        let want = ["aes", "avx", "avx2", "avx512bw", "avx512f", "bmi2", "sse", "sse2", "sse4_1", "sse4_2", "ssse3"];
        assert_eq!(f.iter().map(String::as_str).collect::<Vec<_>>(), want);
    }

    #[test]
    fn arm_features_all_count() {
        let f = parse("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics\n");
        assert!(f.contains("atomics") && f.contains("fp") && f.len() == 9);
    }

    #[test]
    fn a_destination_lacking_a_feature_is_named() {
        let src: Vec<String> = ["sse2", "avx2", "avx512f"].map(String::from).to_vec();
        let here: BTreeSet<String> = ["sse2", "avx2"].map(String::from).into();
        assert_eq!(missing(&src, &here), Some(vec!["avx512f".to_string()]));
        let more: BTreeSet<String> = ["sse2", "avx2", "avx512f", "amx_tile"].map(String::from).into();
        assert_eq!(missing(&src, &more), None, "more features here is fine");
        assert_eq!(missing(&[], &here), None, "an older source sends none");
        assert!(refusal(&["avx512f".into()]).contains("avx512f"));
    }
}
