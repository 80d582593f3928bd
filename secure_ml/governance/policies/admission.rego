# Kubernetes admission policy for the model server: the rules Gatekeeper or Kyverno would enforce.
#
# Input: one Kubernetes object, bare or as an AdmissionReview (`input.request.object`).
# Data: data.secure_ml_config.admission.signed_model_digests (digests of signed, verified models),
#       .model_digest_annotation (on the pod: every model digest it serves, comma-separated),
#       .model_namespaces (where only signed models may run; an object with no namespace counts
#       as being there, so leaving it out never skips the rule).
# The hardening rules apply to every pod (model server and Dagster run/step pods alike).
# `deny` holds one reason per violated rule; an object is admitted only when it is empty.
package secure_ml.admission

import rego.v1

obj := input.request.object if input.request.object
else := input

adm := data.secure_ml_config.admission

default allow := false

allow if count(deny) == 0

workload_kinds := {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}

pod_spec := obj.spec.template.spec if obj.kind in workload_kinds
else := obj.spec if obj.kind == "Pod"

pod_meta := obj.spec.template.metadata if obj.kind in workload_kinds
else := obj.metadata if obj.kind == "Pod"

containers contains c if {
	some c in pod_spec.containers
}

containers contains c if {
	some c in pod_spec.initContainers
}

name := concat("/", [obj.kind, object.get(obj, ["metadata", "name"], "?")])

# -- hardened security context ---------------------------------------------------------------
run_as_non_root(c) if c.securityContext.runAsNonRoot == true

run_as_non_root(c) if {
	not c.securityContext.runAsNonRoot == false
	pod_spec.securityContext.runAsNonRoot == true
}

deny contains msg if {
	some c in containers
	not run_as_non_root(c)
	msg := concat("", [name, sprintf(": container %s may run as root (set runAsNonRoot: true)", [c.name])])
}

deny contains msg if {
	some c in containers
	object.get(c, ["securityContext", "runAsUser"], object.get(pod_spec, ["securityContext", "runAsUser"], 1)) == 0
	msg := concat("", [name, sprintf(": container %s runs as UID 0", [c.name])])
}

deny contains msg if {
	some c in containers
	not c.securityContext.readOnlyRootFilesystem == true
	msg := concat("", [name, sprintf(": container %s has a writable root filesystem", [c.name])])
}

deny contains msg if {
	some c in containers
	not c.securityContext.allowPrivilegeEscalation == false
	msg := concat("", [name, sprintf(": container %s allows privilege escalation", [c.name])])
}

deny contains msg if {
	some c in containers
	c.securityContext.privileged == true
	msg := concat("", [name, sprintf(": container %s is privileged", [c.name])])
}

deny contains msg if {
	some c in containers
	not "ALL" in object.get(c, ["securityContext", "capabilities", "drop"], [])
	msg := concat("", [name, sprintf(": container %s does not drop ALL capabilities", [c.name])])
}

deny contains msg if {
	some c in containers
	count(object.get(c, ["securityContext", "capabilities", "add"], [])) > 0
	msg := concat("", [name, sprintf(": container %s adds capabilities", [c.name])])
}

seccomp_default(c) if c.securityContext.seccompProfile.type == "RuntimeDefault"

seccomp_default(c) if {
	not c.securityContext.seccompProfile
	pod_spec.securityContext.seccompProfile.type == "RuntimeDefault"
}

deny contains msg if {
	some c in containers
	not seccomp_default(c)
	msg := concat("", [name, sprintf(": container %s does not use the RuntimeDefault seccomp profile", [c.name])])
}

deny contains msg if {
	some c in containers
	some resource in ["cpu", "memory"]
	not c.resources.limits[resource]
	msg := concat("", [name, sprintf(": container %s has no ", [c.name]), resource, " limit"])
}

deny contains msg if {
	some c in containers
	not regex.match(`@sha256:[0-9a-f]{64}$`, c.image)
	msg := concat("", [name, sprintf(": container %s image %s is not pinned by digest", [c.name, c.image])])
}

deny contains msg if {
	some field in ["hostNetwork", "hostPID", "hostIPC"]
	pod_spec[field] == true
	msg := concat("", [name, ": the pod uses ", field])
}

deny contains msg if {
	some v in pod_spec.volumes
	v.hostPath
	msg := concat("", [name, sprintf(": volume %s mounts a host path", [v.name])])
}

# The model server needs no Kubernetes API access (Dagster's run pods do: they launch step jobs).
deny contains msg if {
	pod_spec
	serves_models
	not pod_spec.automountServiceAccountToken == false
	msg := concat("", [name, ": the pod mounts a service account token it does not need"])
}

# -- only signed model digests -------------------------------------------------------------------
serves_models if not obj.metadata.namespace

serves_models if obj.metadata.namespace in object.get(adm, "model_namespaces", [])

model_digest := object.get(object.get(pod_meta, "annotations", {}), adm.model_digest_annotation, "")

# One server may serve several models: the annotation lists each pinned digest, comma-separated.
model_digests := [d | some d in split(model_digest, ","); d != ""]

deny contains msg if {
	pod_spec
	serves_models
	count(model_digests) == 0
	msg := concat("", [name, sprintf(": no model digest pinned (annotation %s)", [adm.model_digest_annotation])])
}

deny contains msg if {
	pod_spec
	serves_models
	some d in model_digests
	not d in adm.signed_model_digests
	msg := concat("", [name, sprintf(": model %s is not a signed, verified model", [d])])
}

verifies_model(c, d) if {
	"verify-model" in c.args
	some i, arg in c.args
	arg == "--digest"
	c.args[i + 1] == d
}

deny contains msg if {
	pod_spec
	serves_models
	some d in model_digests
	count([c | some c in pod_spec.initContainers; verifies_model(c, d)]) == 0
	msg := concat("", [name, sprintf(": no init container runs `secure-ml verify-model --digest %s`", [d])])
}

# -- exposure ----------------------------------------------------------------------------------
deny contains msg if {
	obj.kind == "Service"
	object.get(obj, ["spec", "type"], "ClusterIP") != "ClusterIP"
	msg := concat("", [name, sprintf(": type %s exposes the model server outside the cluster", [obj.spec.type])])
}
