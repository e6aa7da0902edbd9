"""The Pulumi program that deploys a datacenter profile onto an existing Kubernetes cluster."""
