# May `input.deployer` deploy model version `input.version` to `input.target`?
#
# Input: deployer {identity, roles}, version, stage, target, pipeline_changers [{identity, why}]
# "Changed the pipeline" (docs/ARCHITECTURE.md, "Who may do what") means, concretely: the identity that registered the
# version (ran the pipeline run that produced it), the identity that trained it, and the git
# author of the code commit recorded in its training record. None of them may deploy it to
# production: whoever can change the code must not also be able to ship it alone.
package secure_ml.deployment

import rego.v1

cfg := data.secure_ml_config.promotion

default allow := false

allow if count(deny) == 0

deny contains msg if {
	not cfg.deployer_role in input.deployer.roles
	msg := sprintf("%s is not a %s", [input.deployer.identity, cfg.deployer_role])
}

deny contains msg if {
	input.stage != "production"
	msg := sprintf("%s is %s in the registry, not production", [input.version, input.stage])
}

deny contains msg if {
	some changer in input.pipeline_changers
	changer.identity == input.deployer.identity
	msg := sprintf("separation of duties: %s %s and may not deploy it to production", [input.deployer.identity, changer.why])
}
