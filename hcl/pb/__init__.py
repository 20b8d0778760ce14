"""Generated protobuf modules for the diag services (from hcl/proto/*.proto; regenerate with
`python -m hclsim.hcl.pb.regenerate`, which tests/test_diag_proto.py checks is up to date)."""
