"""The hypervisor: the partition and its VPs, hypercalls, VTL switches, intercept messages and the scheduler."""
