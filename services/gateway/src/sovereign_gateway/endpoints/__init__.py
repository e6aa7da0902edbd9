"""The gateway's endpoints, one module per group; each gives its routes, built on the guard."""
