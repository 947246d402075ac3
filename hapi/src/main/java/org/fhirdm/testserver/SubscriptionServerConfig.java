package org.fhirdm.testserver;

import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.jpa.topic.SubscriptionTopicConfig;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;

/**
 * FHIR R4 Subscriptions with rest-hook delivery (HAPI's JPA subscription module), matched in
 * memory and delivered through the in-process channels of {@link PersistenceConfig}.
 *
 * <p>On by default ({@code --testserver.subscriptions=false} turns it off): a server a
 * Subscription is created on activates it and delivers its notifications.
 */
@Configuration
@ConditionalOnProperty(prefix = "testserver", name = "subscriptions", havingValue = "true", matchIfMissing = true)
@Import({SubscriptionSubmitterConfig.class, SubscriptionProcessorConfig.class, SubscriptionTopicConfig.class})
public class SubscriptionServerConfig {

	/** The processor wants an e-mail sender; the e-mail channel is not enabled, so none sends. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {
			throw new UnsupportedOperationException("e-mail subscriptions are not enabled");
		};
	}
}
