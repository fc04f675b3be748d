"""The --ray-address probe against a real Ray cluster: its GCS answers as Ray, so the probe lets it through."""

import ray

from services.ray_runtime import check_ray_address


def test_a_real_ray_gcs_passes_the_address_probe(ray_session: None) -> None:
    address = ray.get_runtime_context().gcs_address
    check_ray_address(address)  # raises when the address does not answer as a Ray cluster
