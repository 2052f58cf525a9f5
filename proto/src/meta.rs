//! Metadata-context names and query matching (`namespace:leaf`).
//!
//! The server side only decides which of an export's available context names a client query
//! selects; which names an export offers is the daemon's business (it asks its storage). That keeps
//! `qemu:allocation-depth` and `qemu:dirty-bitmap:NAME` a matter of listing more names.

/// The one context every export offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// How a query is matched against the available names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryUse {
    /// LIST_META_CONTEXT: an empty leaf (`base:`, `qemu:`, `qemu:dirty-bitmap:`) is a wildcard
    /// over everything below it.
    List,
    /// SET_META_CONTEXT: only exact names select a context.
    Set,
}

/// True when `query` selects the available context `name`.
pub fn query_matches(query: &str, name: &str, usage: QueryUse) -> bool {
    if query == name {
        return true;
    }
    // A wildcard query is a namespace (or a namespace plus a leaf prefix) ending in ':'.
    usage == QueryUse::List
        && query.ends_with(':')
        && query.contains(':')
        && name.starts_with(query)
}

/// The names in `available` that `query` selects, in `available`'s order.
pub fn select<'a>(query: &str, available: &'a [String], usage: QueryUse) -> Vec<&'a str> {
    available
        .iter()
        .filter(|name| query_matches(query, name, usage))
        .map(String::as_str)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn avail() -> Vec<String> {
        vec![
            "base:allocation".into(),
            "qemu:allocation-depth".into(),
            "qemu:dirty-bitmap:snap1".into(),
        ]
    }

    #[test]
    fn exact_name_selects_in_both_uses() {
        assert_eq!(
            select("base:allocation", &avail(), QueryUse::Set),
            ["base:allocation"]
        );
        assert_eq!(
            select("base:allocation", &avail(), QueryUse::List),
            ["base:allocation"]
        );
    }

    #[test]
    fn empty_leaf_is_a_wildcard_only_when_listing() {
        assert_eq!(
            select("base:", &avail(), QueryUse::List),
            ["base:allocation"]
        );
        assert!(select("base:", &avail(), QueryUse::Set).is_empty());
        assert_eq!(
            select("qemu:", &avail(), QueryUse::List),
            ["qemu:allocation-depth", "qemu:dirty-bitmap:snap1"]
        );
        assert_eq!(
            select("qemu:dirty-bitmap:", &avail(), QueryUse::List),
            ["qemu:dirty-bitmap:snap1"]
        );
    }

    #[test]
    fn unknown_namespaces_and_leaves_are_ignored() {
        assert!(select("x-foo:bar", &avail(), QueryUse::List).is_empty());
        assert!(select("base:nothing", &avail(), QueryUse::Set).is_empty());
        assert!(select("nocolon", &avail(), QueryUse::List).is_empty());
    }
}
