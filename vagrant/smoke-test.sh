#!/usr/bin/env bash
# End-to-end check of a cluster that runs nodeagent in place of kube-proxy: the Vagrant cluster, or any
# cluster kubectl points at whose nodes can run nodeagent's image. Creates two namespaces (removed at
# the end) and prints one line per check, then "N passed, N failed"; exits 1 if anything failed.
#   sudo /nodeagent/vagrant/smoke-test.sh                        (on the Vagrant control plane)
#   NODEAGENT_IMAGE=REGISTRY/nodeagent:TAG vagrant/smoke-test.sh  (elsewhere; curl must reach the nodes)
# What it checks:
#   1. the nodeagent DaemonSets are rolled out on every node, and no kube-proxy pod runs
#   2. every node's agent is healthy (:10256/healthz) and names its datapath (:10249/proxyMode)
#   3. cluster DNS, itself a Service, resolves a Service name from a pod
#   4. a ClusterIP Service spreads TCP over both endpoints (on two nodes) and carries UDP
#   5. a NodePort Service answers on every node's InternalIP, from outside the pods
#   6. the mesh: each tunnel serves its enrolled pods' identities; an AuthorizationPolicy DENY stops the
#      client and deleting it lets the client through again; PeerAuthentication STRICT refuses a client
#      outside the mesh and still admits the enrolled one
# SMOKE_MESH=0 skips 6, SMOKE_KEEP=1 keeps the namespaces, SMOKE_TIMEOUT (seconds, 180) bounds each wait.
set -uo pipefail

IMAGE="${NODEAGENT_IMAGE:-localhost/nodeagent:dev}"
NS=nodeagent-smoke
PLAIN=nodeagent-smoke-plain
TIMEOUT="${SMOKE_TIMEOUT:-180}"
if [ -z "${KUBECONFIG:-}" ] && [ ! -r "${HOME:-/root}/.kube/config" ] && [ -r /etc/kubernetes/admin.conf ]; then
  export KUBECONFIG=/etc/kubernetes/admin.conf
fi

passed=0
failed=0
ok() { passed=$((passed + 1)); printf 'ok:   %s\n' "$*"; }
fail() { failed=$((failed + 1)); printf 'FAIL: %s\n' "$*"; }
# Poll `$@` until it succeeds or TIMEOUT seconds pass.
eventually() {
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -ge "$deadline" ] && return 1
    sleep 2
  done
}
in_pod() { local ns="$1" pod="$2"; shift 2; kubectl -n "$ns" exec "$pod" -- "$@"; }
request() { local ns="$1" pod="$2"; shift 2; in_pod "$ns" "$pod" nodeagent workload request --timeout 3 "$@"; }
fails() { ! "$@"; }

for tool in kubectl curl; do
  command -v "$tool" >/dev/null || { echo "smoke-test: $tool is needed" >&2; exit 2; }
done
if [ "${SMOKE_KEEP:-0}" != 1 ]; then
  trap 'kubectl delete namespace "$NS" "$PLAIN" --ignore-not-found --wait=false >/dev/null 2>&1' EXIT
fi

echo "== 1. nodeagent in place of kube-proxy"
for ds in nodeagent nodeagent-ztunnel; do
  if kubectl -n nodeagent rollout status "daemonset/$ds" --timeout="${TIMEOUT}s" >/dev/null; then
    ok "daemonset $ds is rolled out on every node"
  else
    fail "daemonset $ds is not rolled out: kubectl -n nodeagent get pods -o wide"
  fi
done
kube_proxy_pods="$(kubectl -n kube-system get pods -l k8s-app=kube-proxy -o name 2>/dev/null | wc -l)"
if [ "$kube_proxy_pods" = 0 ]; then ok "no kube-proxy pod runs"; else
  fail "$kube_proxy_pods kube-proxy pods run: these checks would not show that nodeagent serves Services"
fi

echo "== 2. the agents"
nodes="$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')"
for node in $nodes; do
  mode="$(kubectl get --raw "/api/v1/nodes/$node:10249/proxy/proxyMode" 2>/dev/null)"
  health="$(kubectl get --raw "/api/v1/nodes/$node:10256/proxy/healthz" 2>/dev/null)"
  case "$mode" in
    ebpf|iptables) ok "$node: datapath $mode, /healthz $health" ;;
    *) fail "$node: /proxyMode answered '$mode', /healthz '$health'" ;;
  esac
done

echo "== 3-5. Services (workloads: $IMAGE)"
kubectl apply -f - >/dev/null <<YAML
apiVersion: v1
kind: Namespace
metadata: {name: $NS, labels: {nodeagent.io/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: $PLAIN}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: $NS}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: $NS}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
        - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule,
           labelSelector: {matchLabels: {app: echo}}}
      containers:
        - name: echo
          image: $IMAGE
          imagePullPolicy: IfNotPresent
          args: [workload, serve, --port, "8080", --udp-port, "8081"]
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
            - {name: NODE_NAME, valueFrom: {fieldRef: {fieldPath: spec.nodeName}}}
          ports: [{name: http, containerPort: 8080}, {name: udp, containerPort: 8081, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: $NS}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}, {name: udp, port: 8081, targetPort: udp, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-nodeport, namespace: $NS}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $NS}
spec:
  serviceAccountName: client
  containers: [{name: client, image: $IMAGE, imagePullPolicy: IfNotPresent, args: [workload, idle]}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: $PLAIN}
spec:
  containers: [{name: client, image: $IMAGE, imagePullPolicy: IfNotPresent, args: [workload, idle]}]
YAML
kubectl -n "$NS" rollout status deployment/echo --timeout="${TIMEOUT}s" >/dev/null || fail "deployment echo did not become available"
for ns in "$NS" "$PLAIN"; do
  kubectl -n "$ns" wait --for=condition=Ready pod/client --timeout="${TIMEOUT}s" >/dev/null || fail "$ns/client is not ready"
done
cluster_ip="$(kubectl -n "$NS" get service echo -o jsonpath='{.spec.clusterIP}')"
node_port="$(kubectl -n "$NS" get service echo-nodeport -o jsonpath='{.spec.ports[0].nodePort}')"
echo_ip="$(kubectl -n "$NS" get pods -l app=echo -o jsonpath='{.items[0].status.podIP}')"

resolved="$(in_pod "$NS" client python3 -c 'import socket, sys; print(socket.gethostbyname(sys.argv[1]))' \
  "echo.$NS.svc.cluster.local" 2>&1)"
if [ "$resolved" = "$cluster_ip" ]; then ok "DNS: echo.$NS.svc.cluster.local is $cluster_ip"; else
  fail "DNS: echo.$NS.svc.cluster.local resolved to '$resolved', not $cluster_ip"
fi

if eventually request "$NS" client "$cluster_ip:80"; then
  answers="$(in_pod "$NS" client sh -c "for i in \$(seq 20); do nodeagent workload request --timeout 3 $cluster_ip:80; done" 2>&1)"
  backends="$(printf '%s\n' "$answers" | grep -o '"pod": "[^"]*"' | sort -u | wc -l)"
  if [ "$backends" = 2 ]; then ok "ClusterIP $cluster_ip:80 (TCP): 20 requests reached both endpoints"; else
    fail "ClusterIP $cluster_ip:80 (TCP): 20 requests reached $backends endpoint(s): $answers"
  fi
else
  fail "ClusterIP $cluster_ip:80 (TCP): no answer from $NS/client"
fi
if eventually request "$NS" client --udp "$cluster_ip:8081"; then ok "ClusterIP $cluster_ip:8081 (UDP) answers"; else
  fail "ClusterIP $cluster_ip:8081 (UDP): no answer"
fi

for address in $(kubectl get nodes -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}'); do
  if eventually curl -fsS --max-time 5 "http://$address:$node_port/"; then ok "NodePort $address:$node_port answers"; else
    fail "NodePort $address:$node_port: no answer from $(hostname)"
  fi
done

if [ "${SMOKE_MESH:-1}" = 1 ]; then
  echo "== 6. the mesh"
  dumps=""
  for pod in $(kubectl -n nodeagent get pods -l app.kubernetes.io/name=nodeagent-ztunnel -o name); do
    dumps+="$(kubectl -n nodeagent exec "$pod" -- python3 -c \
      'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:15000/config_dump", timeout=5).read().decode())' 2>/dev/null)"
  done
  for identity in "spiffe://cluster.local/ns/$NS/sa/default" "spiffe://cluster.local/ns/$NS/sa/client"; do
    if grep -qF "$identity" <<<"$dumps"; then ok "a tunnel serves $identity"; else fail "no tunnel serves $identity"; fi
  done

  kubectl apply -f - >/dev/null <<YAML
apiVersion: security.nodeagent.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: $NS}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/$NS/sa/client]}}]}]
YAML
  if eventually fails request "$NS" client "$cluster_ip:80"; then ok "AuthorizationPolicy DENY: $NS/client is refused"; else
    fail "AuthorizationPolicy DENY: $NS/client still gets through"
  fi
  kubectl -n "$NS" delete authorizationpolicy deny-client >/dev/null
  if eventually request "$NS" client "$cluster_ip:80"; then ok "policy deleted: $NS/client gets through again"; else
    fail "policy deleted: $NS/client is still refused"
  fi

  if eventually request "$PLAIN" client "$echo_ip:8080"; then ok "PERMISSIVE: $PLAIN/client (outside the mesh) reaches $echo_ip"; else
    fail "PERMISSIVE: $PLAIN/client cannot reach $echo_ip"
  fi
  kubectl apply -f - >/dev/null <<YAML
apiVersion: security.nodeagent.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: $NS}
spec: {mtls: {mode: STRICT}}
YAML
  if eventually fails request "$PLAIN" client "$echo_ip:8080"; then ok "STRICT: plaintext from $PLAIN/client is refused"; else
    fail "STRICT: plaintext from $PLAIN/client still reaches $echo_ip"
  fi
  if request "$NS" client "$echo_ip:8080" >/dev/null 2>&1; then ok "STRICT: $NS/client (mTLS) still reaches $echo_ip"; else
    fail "STRICT: $NS/client (mTLS) is refused too"
  fi
  kubectl -n "$NS" delete peerauthentication strict >/dev/null
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
