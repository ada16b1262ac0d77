"""Ray for small machines stays on loopback: nothing outside this machine can reach it."""


def test_local_ray_binds_to_loopback(ray_local):
    ray = ray_local
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]

    @ray.remote(num_cpus=0.1)
    def worker_ip() -> str:
        import ray

        return ray.util.get_node_ip_address()

    assert ray.get(worker_ip.remote()) == "127.0.0.1"
