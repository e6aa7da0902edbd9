"""The gateway as a product of its own: the wheelhouse a node installs offline, and the OCI
image a cluster runs."""
