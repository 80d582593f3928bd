# Promotion policy: may model version `input.version` move to `input.target_stage`?
#
# Input (built by secure_ml.registry.promotion_input):
#   version, model_digest, target_stage ("staging" | "production")
#   evaluation {passed, metrics {name: number}, fairness_gaps [{attribute, metric, value}], robustness {name: number}}
#   scan {blocking, counts, findings[{id, severity, blocking, where}]}
#   signature {verified, digest, reason}        -- verified from the bytes, never from metadata
#   attestation {verified, subject_matches, reason}
#   provenance {source, source_sha256, approved, data_actor}
#   training {actor, code_commit, code_author}
#   registered_by
#   approvals [{identity, roles}]
# Data: data.secure_ml_config.promotion (secure_ml/config/release.yaml, section `promotion`).
#
# Every rule adds a human-readable reason to `deny`; `allow` holds only when there is none.
package secure_ml.promotion

import rego.v1

cfg := data.secure_ml_config.promotion

default allow := false

allow if count(deny) == 0

# -- evaluation and bias ------------------------------------------------------------------
deny contains "no model evaluation was recorded for this version" if not input.evaluation

deny contains msg if {
	input.evaluation
	input.evaluation.passed != true
	msg := "the model evaluation did not pass its own thresholds"
}

deny contains msg if {
	some name, minimum in cfg.min_metrics
	value := input.evaluation.metrics[name]
	is_number(value)
	value < minimum
	msg := sprintf("metric %s is %v, under the minimum %v", [name, value, minimum])
}

deny contains msg if {
	input.evaluation
	some name, _ in cfg.min_metrics
	not is_number(input.evaluation.metrics[name])
	msg := sprintf("metric %s is missing from the evaluation", [name])
}

deny contains msg if {
	some gap in input.evaluation.fairness_gaps
	maximum := cfg.max_fairness_gap[gap.metric]
	abs(gap.value) > maximum
	msg := sprintf("fairness breach: %s for %s is %v, over the maximum %v", [gap.metric, gap.attribute, gap.value, maximum])
}

deny contains msg if {
	input.evaluation
	some name, _ in cfg.max_fairness_gap
	count([g | some g in object.get(input.evaluation, "fairness_gaps", []); g.metric == name]) == 0
	msg := sprintf("bias metric %s is missing from the evaluation", [name])
}

deny contains msg if {
	some name, minimum in cfg.min_robustness
	value := input.evaluation.robustness[name]
	is_number(value)
	value < minimum
	msg := sprintf("robustness %s is %v, under the minimum %v", [name, value, minimum])
}

# -- scan findings ------------------------------------------------------------------------
deny contains "no scan report was recorded for this version" if not input.scan

deny contains msg if {
	some finding in input.scan.findings
	finding.blocking == true
	msg := sprintf("blocking scan finding: %s (%s) in %s", [finding.id, finding.severity, finding.where])
}

deny contains "the scan report has blocking findings" if {
	input.scan.blocking == true
	count([f | some f in input.scan.findings; f.blocking == true]) == 0
}

# -- signature and attestation, verified from the bytes -----------------------------------
deny contains msg if {
	not input.signature.verified == true
	msg := concat("", ["the model signature did not verify: ", object.get(input, ["signature", "reason"], "no signature")])
}

deny contains msg if {
	input.signature.verified == true
	input.signature.digest != input.model_digest
	msg := sprintf("the signature covers model %s, not the registered model %s", [input.signature.digest, input.model_digest])
}

deny contains msg if {
	not input.attestation.verified == true
	msg := concat("", ["the attestation did not verify: ", object.get(input, ["attestation", "reason"], "no attestation")])
}

deny contains "the attestation's subjects do not name the signed model" if {
	input.attestation.verified == true
	input.attestation.subject_matches != true
}

# -- provenance: approved sources only ------------------------------------------------------
deny contains msg if {
	not input.provenance.approved == true
	msg := concat("", ["the training data came from ", object.get(input, ["provenance", "source"], "an unknown source"), ", which is not an approved source"])
}

# -- approvals and separation of duties (production only) ------------------------------------
conflicted contains who if {
	some who in [input.provenance.data_actor, input.training.actor]
	is_string(who)
	who != ""
}

counted_approvals contains approval.identity if {
	some approval in input.approvals
	cfg.approver_role in approval.roles
	not approval.identity in conflicted
}

deny contains msg if {
	input.target_stage == "production"
	count(counted_approvals) < cfg.required_approvals
	msg := sprintf("production needs %d approval(s) by an approver who neither added the data nor trained the model; it has %d", [cfg.required_approvals, count(counted_approvals)])
}

deny contains msg if {
	input.target_stage == "production"
	count(counted_approvals) < cfg.required_approvals
	some approval in input.approvals
	approval.identity in conflicted
	msg := concat("", ["the approval by ", approval.identity, " does not count: ", conflict_reason(approval.identity)])
}

conflict_reason(who) := "they added the training data and trained the model" if {
	who == input.provenance.data_actor
	who == input.training.actor
} else := "they added the training data" if {
	who == input.provenance.data_actor
} else := "they trained the model"
