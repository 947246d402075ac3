package org.fhirdm.testserver;

import org.springframework.boot.SpringApplication;
import org.springframework.boot.autoconfigure.SpringBootApplication;
import org.springframework.boot.autoconfigure.data.jpa.JpaRepositoriesAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchClientAutoConfiguration;
import org.springframework.boot.autoconfigure.elasticsearch.ElasticsearchRestClientAutoConfiguration;
import org.springframework.boot.autoconfigure.flyway.FlywayAutoConfiguration;
import org.springframework.boot.autoconfigure.orm.jpa.HibernateJpaAutoConfiguration;
import org.springframework.boot.autoconfigure.quartz.QuartzAutoConfiguration;
import org.springframework.boot.autoconfigure.thymeleaf.ThymeleafAutoConfiguration;
import org.springframework.boot.context.properties.EnableConfigurationProperties;

/**
 * Entry point of the fhir-dm local FHIR R4 test server.
 *
 * <p>A HAPI FHIR JPA server on an in-memory H2 database, served by embedded Tomcat.
 * The FHIR base URL is {@code http://<host>:<server.port>/fhir}; every start begins
 * with an empty database.
 *
 * <p>Spring Boot auto-configurations that would react to libraries the HAPI JPA
 * module merely carries on its classpath (Flyway, Quartz, Elasticsearch, Thymeleaf)
 * are switched off, and so is Boot's own JPA set-up: the entity manager factory,
 * transaction manager and repositories are wired the way HAPI expects in
 * {@link PersistenceConfig} and by HAPI's {@code JpaConfig}.
 */
@SpringBootApplication(
		exclude = {
			HibernateJpaAutoConfiguration.class,
			JpaRepositoriesAutoConfiguration.class,
			FlywayAutoConfiguration.class,
			QuartzAutoConfiguration.class,
			ThymeleafAutoConfiguration.class,
			ElasticsearchClientAutoConfiguration.class,
			ElasticsearchRestClientAutoConfiguration.class
		})
@EnableConfigurationProperties(TestServerProperties.class)
public class TestServerApplication {

	public static void main(String[] args) {
		SpringApplication application = new SpringApplication(TestServerApplication.class);
		application.addListeners(new StdinWatchdog());
		application.run(args);
	}
}
