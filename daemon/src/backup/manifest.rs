//! Backup manifests: the full chunk list of one volume at one point in time.
