// What a cgroup socket program (sock_addr, sock_ops, sockopt) returns to the kernel. Shared by
// sock_lb.c and mesh_capture.c.

#ifndef NA_LIB_CGROUP_H
#define NA_LIB_CGROUP_H

#define CGROUP_PROCEED 1  // the call goes on (with whatever the program changed)
#define CGROUP_REFUSE 0   // the call fails: EPERM, or the error set with bpf_set_retval

#endif
