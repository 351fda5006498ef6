"""Engine pools: a model's remote engine as several replicas, each request sent to the one that will
serve it fastest (live load, prompt-prefix and session affinity), with retries and ejection.

- ``settings.PoolSettings``: the fields every backend's remote-engine settings mix in
  (``MODELPLEX_<SVC>_UPSTREAM_URL`` as a comma-separated list, ``..._POOL_POLICY``, ``..._UPSTREAM_DISCOVERY``).
- ``sources``: where the replicas come from (``ReplicaSource``: full snapshots of ready ``host:port``s);
  static list, DNS, and Kubernetes (``kubernetes.py``, imported only when named).
"""
