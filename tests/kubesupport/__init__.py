"""Harness for tests that need Kubernetes: a real control plane and a kubelet stand-in."""
