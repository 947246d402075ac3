package org.fhirdm.testserver;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.search.HapiHSearchAnalysisConfigurers;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import jakarta.persistence.EntityManagerFactory;
import java.util.HashMap;
import java.util.Map;
import javax.sql.DataSource;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

/**
 * Storage side of the server: HAPI's R4 JPA configuration plus the beans it expects
 * the hosting application to supply (storage settings, entity manager factory,
 * transaction manager, binary storage) and the in-memory message channels its
 * batch2 job framework (reindexing, expunge, bulk export ...) runs on.
 *
 * <p>The {@link DataSource} itself comes from Spring Boot ({@code spring.datasource.*},
 * an in-memory H2 database by default).
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class,
	HapiJpaConfig.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	// In-process message broker; HAPI's batch2 job framework sends its work through it.
	SubscriptionChannelConfig.class,
	ThreadPoolFactoryConfig.class
})
public class PersistenceConfig {

	private static final Logger LOG = LoggerFactory.getLogger(PersistenceConfig.class);

	@Bean
	public JpaStorageSettings storageSettings(TestServerProperties props) {
		JpaStorageSettings settings = new JpaStorageSettings();

		// A search always reflects the current data: no reuse of earlier result sets.
		long reuseMillis = props.getReuseCachedSearchResultsMillis();
		settings.setReuseCachedSearchResultsForMillis(reuseMillis > 0 ? reuseMillis : null);

		settings.setEnforceReferentialIntegrityOnWrite(props.isEnforceReferentialIntegrityOnWrite());
		settings.setEnforceReferentialIntegrityOnDelete(props.isEnforceReferentialIntegrityOnDelete());
		settings.setAutoCreatePlaceholderReferenceTargets(props.isAutoCreatePlaceholderReferenceTargets());
		settings.setAllowExternalReferences(props.isAllowExternalReferences());
		settings.setAllowMultipleDelete(props.isAllowMultipleDelete());
		settings.setResourceClientIdStrategy(props.getClientIdStrategy());
		settings.setFetchSizeDefaultMaximum(props.getMaxPageSize());

		// No Hibernate Search / Lucene: plain database search only.
		settings.setHibernateSearchIndexFullText(false);
		settings.setHibernateSearchIndexSearchParams(false);

		LOG.info(
				"Storage settings: reuse cached searches={} ms, referential integrity on write={}, "
						+ "placeholder targets={}, external references={}, client id strategy={}",
				settings.getReuseCachedSearchResultsForMillis(),
				settings.isEnforceReferentialIntegrityOnWrite(),
				settings.isAutoCreatePlaceholderReferenceTargets(),
				settings.isAllowExternalReferences(),
				settings.getResourceClientIdStrategy());
		return settings;
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings();
	}

	@Bean
	public SubscriptionSettings subscriptionSettings(TestServerProperties props) {
		SubscriptionSettings settings = new SubscriptionSettings();
		if (props.isSubscriptions()) {
			// Rest-hook only (see SubscriptionServerConfig), matched in memory.
			settings.addSupportedSubscriptionType(
					org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType.RESTHOOK);
			// Criteria HAPI cannot match in memory are refused when the Subscription is stored.
			settings.setOnlyAllowInMemorySubscriptions(true);
			// How often stored resource changes reach the matcher (every delivery waits for it).
			settings.setSubscriptionIntervalInMs(props.getSubscriptionIntervalMs());
			// A created or changed Subscription is activated at once, not on that timer.
			settings.setSubscriptionChangeQueuedImmediately(true);
		}
		return settings;
	}

	@Bean
	@Primary
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings,
			DataSource dataSource,
			TestServerProperties props) {
		LocalContainerEntityManagerFactoryBean factory =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		factory.setPersistenceUnitName("FHIR_DM_TEST_SERVER");
		factory.setDataSource(dataSource);

		Map<String, Object> jpa = new HashMap<>();
		// HAPI reads the dialect back from this map (HibernatePropertiesProvider).
		jpa.put("hibernate.dialect", props.getHibernateDialect());
		jpa.put("hibernate.hbm2ddl.auto", "update");
		if (props.isTerminologyIndex()) {
			// Concept index for $subsumes / $expand, kept in memory like the database.
			jpa.put("hibernate.search.enabled", "true");
			jpa.put("hibernate.search.backend.type", "lucene");
			jpa.put("hibernate.search.backend.directory.type", "local-heap");
			jpa.put("hibernate.search.backend.lucene_version", "LUCENE_CURRENT");
			jpa.put(
					"hibernate.search.backend.analysis.configurer",
					HapiHSearchAnalysisConfigurers.HapiLuceneAnalysisConfigurer.class.getName());
		} else {
			jpa.put("hibernate.search.enabled", "false");
		}
		jpa.put("hibernate.format_sql", "false");
		jpa.put("hibernate.show_sql", "false");
		jpa.put("hibernate.jdbc.batch_size", "20");
		jpa.put("hibernate.cache.use_query_cache", "false");
		jpa.put("hibernate.cache.use_second_level_cache", "false");
		factory.setJpaPropertyMap(jpa);
		return factory;
	}

	@Bean
	@Primary
	public JpaTransactionManager transactionManager(EntityManagerFactory entityManagerFactory) {
		JpaTransactionManager manager = new JpaTransactionManager();
		manager.setEntityManagerFactory(entityManagerFactory);
		return manager;
	}

	/** Binary / Attachment payloads kept in the (in-memory) database. */
	@Bean
	public DatabaseBinaryContentStorageSvcImpl binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}
}
