// The pure-Kotlin core (org.minicpmvedge.core): no Android imports, so it is a plain JVM module.
// Its JUnit 5 tests read a conformance kit (CONFORMANCE_KIT); in this repository they run with
// apps/android/tools/test-core.py (kotlinc + the JUnit console launcher), not with Gradle.
plugins {
    id("org.jetbrains.kotlin.jvm")
}

java {
    sourceCompatibility = JavaVersion.VERSION_11
    targetCompatibility = JavaVersion.VERSION_11
}

kotlin {
    compilerOptions {
        jvmTarget.set(org.jetbrains.kotlin.gradle.dsl.JvmTarget.JVM_11)
    }
}

dependencies {
    testImplementation(kotlin("test-junit5"))
    testImplementation("org.junit.jupiter:junit-jupiter:5.9.2")
    testRuntimeOnly("org.junit.platform:junit-platform-launcher:1.9.2")
}

tasks.test {
    useJUnitPlatform()
    System.getenv("CONFORMANCE_KIT")?.let { environment("CONFORMANCE_KIT", it) }
}
