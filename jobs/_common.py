"""Options every job entrypoint shares: which cluster, and GPUs to wait for on one that scales from zero.
(``python jobs/x.py`` puts this folder on sys.path, so the jobs import it as ``_common``.)"""


def add_cluster_args(p) -> None:
    p.add_argument("--wait-for-gpus", type=int, default=0, metavar="N",
                   help="first ask the autoscaler for N GPUs and wait for them (a cluster that scales from zero)")
    p.add_argument("--wait-timeout", type=float, default=900, help="seconds to wait for those GPUs (default 900)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
