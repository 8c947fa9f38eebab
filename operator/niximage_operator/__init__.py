"""niximage operator: reconciles NixImage resources into builder pods and status."""
