"""The lease store port (base), its etcd adapter (etcd) and an in-memory fake (memory)."""
