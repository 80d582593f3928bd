# May `input.approver` approve model version `input.version`? (separation of duties)
#
# Input: approver {identity, roles}, provenance {data_actor}, training {actor}, approvals [{identity}]
# A self-approval (by whoever added the data or trained the model) is denied, whatever roles
# the identity holds: one person must never be able to push their own model to production.
package secure_ml.approval

import rego.v1

cfg := data.secure_ml_config.promotion

default allow := false

allow if count(deny) == 0

deny contains msg if {
	not cfg.approver_role in input.approver.roles
	msg := sprintf("%s is not an %s", [input.approver.identity, cfg.approver_role])
}

deny contains msg if {
	input.approver.identity == input.provenance.data_actor
	msg := sprintf("self-approval: %s added the training data of %s and may not approve it", [input.approver.identity, input.version])
}

deny contains msg if {
	input.approver.identity == input.training.actor
	msg := sprintf("self-approval: %s trained %s and may not approve it", [input.approver.identity, input.version])
}

deny contains msg if {
	some approval in input.approvals
	approval.identity == input.approver.identity
	msg := sprintf("%s has already approved %s", [input.approver.identity, input.version])
}

deny contains msg if {
	not input.stage in {"candidate", "staging"}
	msg := sprintf("%s is %s; only a candidate or staging version can be approved", [input.version, input.stage])
}
